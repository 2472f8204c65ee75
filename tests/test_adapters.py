"""The model adapters on tiny random-config instances of the real architectures (no downloads).

LLaVA-1.5 (llava-hf layout), Qwen2-VL and Qwen2.5-VL are built with their own model, processor and tokenizer
classes (tests/tiny_models.py) and run through the adapter interface: answer-only labels after image-token
expansion, loss and gradients per parameter group, batched generation with stopping, save and reload with
plain transformers, and locating a phrase inside an answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmunlearn.models.base import IGNORE, Item, ModelAdapter
from mmunlearn.models.llava import LlavaAdapter
from mmunlearn.models.qwen2_vl import Qwen2VLAdapter, has_torchvision, load_processor
from tiny_models import BUILDERS, build_qwen2_vl

ADAPTERS = {"llava": LlavaAdapter, "qwen2-vl": Qwen2VLAdapter, "qwen2.5-vl": Qwen2VLAdapter}
GROUPS = ("vision", "projector", "language")


def picture(width: int = 56, height: int = 56, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


ITEMS = [
    Item("Who is this?", "She was born in Paris, France.", picture()),
    Item("What is the capital of France?", "Paris is the capital of France."),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation, which is slow when the CPU is contended."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(BUILDERS))
def adapter(request) -> ModelAdapter:
    model, processor = BUILDERS[request.param]()
    return ADAPTERS[request.param](model, processor)


def is_qwen(adapter: ModelAdapter) -> bool:
    return adapter.model.config.model_type in Qwen2VLAdapter.model_types


def image_token_counts(adapter: ModelAdapter, enc: dict) -> list[int]:
    """Placeholder tokens each image expands to, from the processor outputs and the model config."""
    cfg = adapter.model.config
    if is_qwen(adapter):
        merge = cfg.vision_config.spatial_merge_size
        return [int(row.prod()) // merge**2 for row in enc["image_grid_thw"]]
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return [side * side] * len(enc["pixel_values"])


def model_inputs(adapter: ModelAdapter, enc: dict) -> dict:
    batch = adapter.to_device(enc)
    batch.pop("answer_start", None)
    return batch


def check_answer_labels(adapter: ModelAdapter, items: list[Item], enc: dict) -> None:
    tok = adapter.tokenizer
    ids, labels, starts = enc["input_ids"], enc["labels"], enc["answer_start"].tolist()
    image_id = adapter.model.config.image_token_id
    end_id = tok.convert_tokens_to_ids(adapter.answer_end)
    counts = iter(image_token_counts(adapter, enc))
    for i, item in enumerate(items):
        pos = (labels[i] != IGNORE).nonzero().flatten().tolist()
        start = starts[i]
        assert pos == list(range(start, start + len(pos))), "labels must be one span starting at answer_start"
        assert labels[i, pos].tolist() == ids[i, pos].tolist()
        assert ids[i, pos[-1]] == end_id
        assert tok.decode(ids[i, pos[:-1]]).strip() == item.answer
        assert tok.decode(ids[i, pos]).strip() == item.answer + adapter.answer_end
        assert (labels[i][enc["attention_mask"][i] == 0] == IGNORE).all()
        # everything before answer_start is the prompt alone, image placeholders expanded
        prompt = adapter.encode([Item(item.prompt, image=item.image)], with_answer=False)["input_ids"][0]
        assert ids[i, :start].tolist() == prompt.tolist()
        image_pos = (ids[i] == image_id).nonzero().flatten()
        if item.image is None:
            assert len(image_pos) == 0
        else:
            assert len(image_pos) == next(counts) > 1
            assert image_pos.max() < start


def test_labels_cover_exactly_the_answer_and_end_token(adapter):
    enc = adapter.encode(ITEMS)
    assert enc["input_ids"].shape == enc["labels"].shape
    assert enc["attention_mask"][:, 0].all(), "training batches are right-padded"
    check_answer_labels(adapter, ITEMS, enc)


def test_loss_is_finite_and_gradients_reach_every_group(adapter):
    model = adapter.model
    params = dict(model.named_parameters())
    groups = adapter.parameter_groups()
    try:
        loss = model(**model_inputs(adapter, adapter.encode(ITEMS))).loss
        assert torch.isfinite(loss)
        loss.backward()
        for g in GROUPS:
            assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in groups[g]), g
        # every parameter is reached, except (LLaVA-1.5 reads CLIP's second-to-last layer) the last CLIP layer
        unreached = {n for n, p in params.items() if p.grad is None or not p.grad.any()}
        if is_qwen(adapter):
            assert not unreached
        else:
            last = adapter.model.config.vision_config.num_hidden_layers - 1
            tails = (f"model.vision_tower.encoder.layers.{last}.", "model.vision_tower.post_layernorm.")
            assert unreached == {n for n in params if n.startswith(tails)}
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            assert torch.isfinite(model(**model_inputs(adapter, adapter.encode(ITEMS[1:]))).loss)
    finally:
        model.zero_grad(set_to_none=True)


def test_parameter_groups_partition_the_model_by_submodule(adapter):
    groups = adapter.parameter_groups()
    named = dict(adapter.model.named_parameters())
    assert sorted(n for g in GROUPS for n in groups[g]) == sorted(named)
    assert all(groups[g] for g in GROUPS)
    inner = adapter.model.model
    if is_qwen(adapter):
        projector = inner.visual.merger
        vision = {id(p) for p in inner.visual.parameters()} - {id(p) for p in projector.parameters()}
    else:
        projector = inner.multi_modal_projector
        vision = {id(p) for p in inner.vision_tower.parameters()}
    language = {id(p) for p in inner.language_model.parameters()} | {id(adapter.model.lm_head.weight)}
    expected = {"vision": vision, "projector": {id(p) for p in projector.parameters()}, "language": language}
    for g in GROUPS:
        assert {id(named[n]) for n in groups[g]} == expected[g], g


def test_image_features_match_placeholder_counts(adapter):
    enc = adapter.encode([ITEMS[0], Item("Who?", "Alice.", picture(seed=1))], with_answer=False)
    pixels = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}
    with torch.no_grad():
        feats = adapter.image_features(pixels)
    hidden = adapter.model.config.text_config.hidden_size
    assert [tuple(f.shape) for f in feats] == [(n, hidden) for n in image_token_counts(adapter, enc)]


def test_generate_left_pads_a_mixed_batch_and_matches_single_items(adapter):
    enc = adapter.encode(ITEMS, with_answer=False)
    assert "labels" not in enc
    assert enc["attention_mask"][:, -1].all() and not enc["attention_mask"][:, 0].all(), "left-padded"
    out = adapter.generate(ITEMS, max_new_tokens=3)
    assert len(out) == len(ITEMS) and all(isinstance(s, str) for s in out)
    assert out == [adapter.generate([it], max_new_tokens=3)[0] for it in ITEMS]


def test_generate_stops_on_every_stop_token(adapter):
    stop_ids = adapter.stop_token_ids()
    assert adapter.tokenizer.convert_tokens_to_ids(adapter.answer_end) in stop_ids
    if is_qwen(adapter):
        expected = {adapter.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        assert set(stop_ids) == expected
    for stop in stop_ids:
        calls: list[int] = []

        def force_stop(module, args, logits, stop=stop, calls=calls):
            calls.append(1)
            logits = logits.clone()
            logits[..., stop] = logits.abs().max() + 100
            return logits

        hook = adapter.model.lm_head.register_forward_hook(force_stop)
        try:
            out = adapter.generate(ITEMS, max_new_tokens=5)
        finally:
            hook.remove()
        assert out == ["", ""]
        assert len(calls) == 1, "generation must end after the first stop token"


def test_save_loads_with_plain_transformers_and_same_logits(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    adapter.save(out)
    cls = type(adapter.model)
    assert type(cls.from_pretrained(out)) is cls
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert type(loaded) is cls
    if has_torchvision() or not is_qwen(adapter):
        processor = AutoProcessor.from_pretrained(out)
    else:
        processor = load_processor(out)
    again = type(adapter)(loaded.eval(), processor)
    enc, enc2 = adapter.encode(ITEMS), again.encode(ITEMS)
    assert enc.keys() == enc2.keys()
    for k in enc:
        assert torch.equal(enc[k], enc2[k]), k
    with torch.no_grad():
        a = adapter.model(**model_inputs(adapter, enc)).logits
        b = loaded(**model_inputs(again, enc2)).logits
    assert torch.equal(a, b)
    assert again.generate(ITEMS, max_new_tokens=3) == adapter.generate(ITEMS, max_new_tokens=3)


def test_prefix_lengths_locate_a_phrase_inside_the_answer(adapter):
    items = [
        Item("Where was she born?", "She was born in Paris, France.", picture()),
        Item("Where was he born?", "He was born in Lisbon and works as a marine biologist."),
    ]
    prefixes = ["She was born in", "He was born in Lisbon and works as a"]
    phrases = [" Paris", " marine biologist"]
    before = adapter.prefix_lengths(items, prefixes).tolist()
    after = adapter.prefix_lengths(items, [p + q for p, q in zip(prefixes, phrases, strict=True)]).tolist()
    enc = adapter.encode(items)
    for i, phrase in enumerate(phrases):
        assert enc["answer_start"][i] < before[i] < after[i]
        assert adapter.tokenizer.decode(enc["input_ids"][i, before[i] : after[i]]).strip() == phrase.strip()
    # an empty prefix is the answer start; a phrase opening the answer, or after a prefix ending in a space
    assert adapter.prefix_lengths(items, ["", ""]).tolist() == enc["answer_start"].tolist()
    cases = ((["", ""], ["She", "He was"]), (["She was born ", "He "], ["in Paris", "was born"]))
    for prefixes, phrases in cases:
        before = adapter.prefix_lengths(items, prefixes).tolist()
        ends = [p + q for p, q in zip(prefixes, phrases, strict=True)]
        after = adapter.prefix_lengths(items, ends).tolist()
        for i, phrase in enumerate(phrases):
            assert adapter.tokenizer.decode(enc["input_ids"][i, before[i] : after[i]]).strip() == phrase


@pytest.fixture(scope="module")
def qwen() -> Qwen2VLAdapter:
    return Qwen2VLAdapter(*build_qwen2_vl())


def test_qwen_batch_with_images_of_different_sizes(qwen):
    items = [
        Item("Who is this?", "She was born in Paris.", picture(56, 56, seed=2)),
        Item("What is the capital of France?", "Paris."),
        Item("Who is this?", "He was born in Lisbon.", picture(112, 56, seed=3)),
    ]
    enc = qwen.encode(items)
    grids = enc["image_grid_thw"].tolist()
    assert grids == [[1, 4, 4], [1, 4, 8]]
    check_answer_labels(qwen, items, enc)
    model = qwen.model
    with torch.no_grad():
        out = model(**model_inputs(qwen, enc))
        assert torch.isfinite(out.loss)
        # each row sees its own image: batched logits equal the single-item logits on real tokens
        for i, item in enumerate(items):
            single = qwen.encode([item])
            n = int(single["attention_mask"].sum())
            ref = model(**model_inputs(qwen, single)).logits[0, :n]
            torch.testing.assert_close(out.logits[i, :n], ref, rtol=1e-4, atol=1e-4)
        feats = qwen.image_features({k: enc[k] for k in ("pixel_values", "image_grid_thw")})
    assert [f.shape[0] for f in feats] == [4, 8]
    texts = qwen.generate(items, max_new_tokens=3)
    assert texts == [qwen.generate([it], max_new_tokens=3)[0] for it in items]


@pytest.mark.skipif(not has_torchvision(), reason="AutoProcessor needs torchvision for Qwen-VL")
def test_qwen_image_only_save_loads_with_auto_processor(tmp_path):
    saved = Qwen2VLAdapter(*build_qwen2_vl(with_video=False))
    saved.save(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.video_processor is not None
    again = Qwen2VLAdapter(saved.model, processor)
    enc, enc2 = saved.encode(ITEMS), again.encode(ITEMS)
    for k in enc:
        assert torch.equal(enc[k], enc2[k]), k


def test_qwen_processor_loads_without_video_processor(tmp_path):
    """The published layout (preprocessor_config.json, tokenizer, chat template) loads image-only too."""
    model, processor = build_qwen2_vl(with_video=False)
    processor.image_processor.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(processor.chat_template)
    model.config.save_pretrained(tmp_path)
    loaded = Qwen2VLAdapter.load_processor(tmp_path)
    a, b = Qwen2VLAdapter(model, processor), Qwen2VLAdapter(model, loaded)
    enc, enc2 = a.encode(ITEMS), b.encode(ITEMS)
    for k in enc:
        assert torch.equal(enc[k], enc2[k]), k
