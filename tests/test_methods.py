"""Every registered unlearning method through one battery on a tiny random LLaVA, plus the mask contract
(MMUnlearner), SIU's data file and masks, the run directory and the configuration files."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mmunlearn import config as C
from mmunlearn.commands import benchmark_corpus
from mmunlearn.data.batches import ImageCache, to_items
from mmunlearn.data.fictitious import FictitiousConfig, make_fictitious
from mmunlearn.data.mmubench import read_siu_json
from mmunlearn.data.schema import Benchmark
from mmunlearn.errors import ConfigError
from mmunlearn.methods import METHODS, Batches, Context, Step
from mmunlearn.methods.mmunlearner import MMUnlearner, MMUnlearnerOptions
from mmunlearn.methods.reference import frozen_copy
from mmunlearn.methods.siu import SIU, name_token_ids, name_variants
from mmunlearn.models.base import IGNORE
from mmunlearn.models.llava import LlavaAdapter
from mmunlearn.models.tiny import TinyConfig, build_tiny
from mmunlearn.train.engine import Engine, LoraOptions, OptimConfig
from mmunlearn.train.unlearn import UnlearnConfig, run_unlearn, training_data, unlearn

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
FAST = {"mmunlearner": {"importance_batches": 2}, "siu": {"non_target_text": 2, "non_target_images": 1,
                                                           "max_new_tokens": 6}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Benchmark, Path]:
    tmp = tmp_path_factory.mktemp("methods")
    bench = make_fictitious(tmp / "data", FictitiousConfig(num_people=8, train_images=2, test_images=1))
    model, processor = build_tiny(benchmark_corpus(bench), TinyConfig(
        vision_width=32, vision_layers=1, text_width=64, text_layers=2, vocab_size=600,
    ))
    model.save_pretrained(tmp / "vanilla")
    processor.save_pretrained(tmp / "vanilla")
    return bench, tmp / "vanilla"


def load(path: Path) -> LlavaAdapter:
    from mmunlearn.models import load_adapter

    return load_adapter(path, device="cpu")


def cfg(method: str, **kw) -> UnlearnConfig:
    opts = kw.pop("method_options", FAST.get(method, {}))
    return UnlearnConfig(method=method, forget_set="forget15", steps=2, batch_size=4, lr=1e-3,
                         method_options=opts, **kw)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains(world, tmp_path: Path, method: str) -> None:
    bench, vanilla = world
    adapter = load(vanilla)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    log = unlearn(adapter, bench, cfg(method), tmp_path, progress=False)
    assert log["steps"] >= 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in log["history"])
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, f"{method}: no parameter moved"
    # every parameter that received a gradient in the last (unmasked) step moved; nothing else is trainable
    stale = [n for n, p in adapter.model.named_parameters() if p.grad is not None and n not in changed]
    assert not stale, f"{method}: trained but unchanged: {stale[:3]}"


@pytest.mark.parametrize("method,options", [
    ("siu", FAST["siu"] | {"legacy_released_code": True}),
    ("siu", FAST["siu"] | {"renormalise": True}),
    ("npo", {"retain": True}),
    ("npo", {"legacy_mean_ce": True}),
    ("mmunlearner", {"importance_batches": 1, "mask_mode": "gradient", "groups": ["language"], "interval": 0}),
    ("mmunlearner", {"importance_batches": 1, "mask_mode": "gradient", "groups": ["language"], "interval": 0,
                     "preserve": "concat", "fisher_loop": "official"}),
    ("ga_kl", {"legacy_text_only": True}),
], ids=["siu-legacy", "siu-renormalise", "npo-rt", "npo-legacy", "mmunlearner-gradient", "mmunlearner-official",
        "ga_kl-legacy"])
def test_method_variants_train(world, tmp_path: Path, method: str, options: dict) -> None:
    bench, vanilla = world
    adapter = load(vanilla)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    # a language mask needs the language model trained (the tiny recipe trains the vision side only)
    extra = {"trainable": ("vision", "projector", "language")} if method == "mmunlearner" else {}
    log = unlearn(adapter, bench, cfg(method, method_options=options, **extra), tmp_path, progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in log["history"])
    assert any(not torch.equal(p, before[n]) for n, p in adapter.model.named_parameters())
    if method == "npo" and options.get("retain"):
        assert "retain_ce" in log["history"][0]


def test_mmunlearner_mask_on_an_untrained_group_says_what_to_train(world, tmp_path: Path) -> None:
    bench, vanilla = world
    opts = {**FAST["mmunlearner"], "groups": ["language"]}  # the tiny recipe trains the vision side only
    with pytest.raises(ConfigError, match=r"masks \['language'\].*trainable=\[language,projector,vision\]"):
        unlearn(load(vanilla), bench, cfg("mmunlearner", method_options=opts), tmp_path, progress=False)
    assert not (tmp_path / "masks.safetensors").exists()  # refused before any saliency score was computed


def test_unknown_method_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'npo'"):
        UnlearnConfig(method="npoo")
    with pytest.raises(ConfigError, match="unknown option 'beta2'"):
        UnlearnConfig(method="npo", method_options={"beta2": 1})


def test_registry_rejects_duplicates_and_non_methods() -> None:
    from mmunlearn.methods import register

    with pytest.raises(ValueError):
        register("ga")(type("Again", (METHODS.get("ga"),), {}))
    with pytest.raises(TypeError):
        register("not_a_method")(object)  # type: ignore[arg-type]


def _mmunlearner(world, tmp_path: Path, mode: str) -> tuple[LlavaAdapter, Context, MMUnlearner, Engine]:
    bench, vanilla = world
    adapter = load(vanilla)
    c = cfg("mmunlearner").resolved()
    f, r = training_data(bench, sorted(bench.forget_set("forget15")), c)
    ctx = Context(adapter, bench, sorted(bench.forget_set("forget15")), f, r, ImageCache(bench), 4, 0, tmp_path)
    method = MMUnlearner(MMUnlearnerOptions(importance_batches=2, mask_mode=mode))
    method.prepare(ctx)
    engine = Engine(adapter, OptimConfig(lr=1e-2, max_steps=10, mask_mode=mode, scheduler="constant"))
    ctx.engine = engine
    return adapter, ctx, method, engine


def _batches(ctx: Context, data, forget: bool) -> Batches:
    ex = data[:4]
    enc = ctx.adapter.encode(to_items(ex, ctx.images))
    return Batches(forget=enc, forget_examples=ex) if forget else Batches(retain=enc, retain_examples=ex)


@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_mask_constrains_the_forget_step_only_in_update_mode(world, tmp_path: Path, mode: str) -> None:
    adapter, ctx, method, engine = _mmunlearner(world, tmp_path, mode)
    # a retain step first, so AdamW carries momentum into the masked forget step
    engine.step(lambda: method.loss(ctx, _batches(ctx, ctx.retain_data, False)))
    snap = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    mask = method.step_mask(ctx, Step(forget=True, masked=True))
    engine.step(lambda: method.loss(ctx, _batches(ctx, ctx.forget_data, True)), mask)
    params = dict(adapter.model.named_parameters())
    mask = {n: m.unpack() for n, m in mask.items()}
    outside = sum(int((params[n] != snap[n])[~m].sum()) for n, m in mask.items())
    unmasked_params = [n for n in params if n not in mask and not torch.equal(params[n], snap[n])]
    inside = sum(int((params[n] != snap[n])[m].sum()) for n, m in mask.items())
    assert inside > 0
    if mode == "update":
        assert outside == 0 and not unmasked_params
    else:  # the released behaviour: momentum moves masked entries, unmasked parameters take the full ascent
        assert outside > 0 and unmasked_params


def test_mask_file_and_stats_are_written_and_reusable(world, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _, ctx, method, _ = _mmunlearner(world, tmp_path / "a", "update")
    stats = yaml.safe_load((tmp_path / "a" / "mask_stats.json").read_text())
    assert set(stats["groups"]) == {"vision", "projector", "language"}
    assert all(0.0 <= g["fraction"] <= 1.0 for g in stats["groups"].values())
    assert all(n.endswith(".weight") and len(m.shape) == 2 for n, m in method.masks.items())
    # 1 bit per entry on disk
    assert all(m.bits.numel() == -(-m.numel // 8) for m in method.masks.values())
    again = MMUnlearner(MMUnlearnerOptions(masks_path=str(tmp_path / "a" / "masks.safetensors")))
    ctx.out_dir = tmp_path / "b"
    ctx.out_dir.mkdir()
    again.prepare(ctx)
    assert again.masks.keys() == method.masks.keys()
    assert all(torch.equal(again.masks[n].unpack(), method.masks[n].unpack()) for n in method.masks)


def test_mmunlearner_with_lora_refuses_or_maps_explicitly(world, tmp_path: Path) -> None:
    bench, vanilla = world
    lora = LoraOptions(r=4, alpha=8, dropout=0.0)
    with pytest.raises(ConfigError, match="lora_mask=rows"):
        unlearn(load(vanilla), bench, cfg("mmunlearner", lora=lora), tmp_path / "a", progress=False)
    adapter = load(vanilla)
    opts = {"importance_batches": 2, "lora_mask": "rows"}
    unlearn(adapter, bench, cfg("mmunlearner", lora=lora, method_options=opts), tmp_path / "b", progress=False)
    names = [n for n, _ in adapter.model.named_parameters()]
    assert any("lora_B" in n for n in names)


def test_lora_rows_mapping_freezes_unselected_rows(world, tmp_path: Path) -> None:
    bench, vanilla = world
    adapter = load(vanilla)
    c = cfg("mmunlearner", lora=LoraOptions(r=4, alpha=8, dropout=0.0)).resolved()
    forget = sorted(bench.forget_set("forget15"))
    f, r = training_data(bench, forget, c)
    ctx = Context(adapter, bench, forget, f, r, ImageCache(bench), 4, 0, tmp_path, lora=True)
    method = MMUnlearner(MMUnlearnerOptions(importance_batches=2, lora_mask="rows"))
    method.prepare(ctx)
    engine = Engine(adapter, OptimConfig(lr=1e-2, max_steps=4, lora=c.lora, scheduler="constant"))
    ctx.engine = engine
    engine.step(lambda: method.loss(ctx, _batches(ctx, ctx.retain_data, False)))
    snap = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    mask = method.step_mask(ctx, Step(forget=True, masked=True))
    assert mask and all(".lora_B." in n for n in mask)
    engine.step(lambda: method.loss(ctx, _batches(ctx, ctx.forget_data, True)), mask)
    for n, p in adapter.model.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, snap[n])
        if n in mask:
            assert torch.equal(p[~mask[n]], snap[n][~mask[n]])


def test_mmunlearner_second_epoch(world, tmp_path: Path) -> None:
    bench, vanilla = world
    c = UnlearnConfig(method="mmunlearner", forget_set="forget15", epochs=2.0, batch_size=16,
                      method_options={"importance_batches": 1})
    log = unlearn(load(vanilla), bench, c, tmp_path, progress=False)
    retain_steps = sum(h["kind"] == "retain" for h in log["history"])
    assert retain_steps == 2 * (log["retain_examples"] // 16)
    assert sum(h["kind"] == "forget" for h in log["history"]) >= 2


@settings(max_examples=200, deadline=None)
@given(forget=st.integers(1, 400), ratio=st.floats(0.05, 40), passes=st.floats(0.5, 8))
def test_mmunlearner_forget_passes_give_every_forget_batch_that_many_ascent_steps(forget, ratio, passes) -> None:
    """interval 0: k = max(1, ⌊#retain / (#forget × forget_passes)⌋) retain iterations per forget step, so an epoch
    has at least forget_passes × #forget forget steps (all retain iterations where there are fewer), and at most
    twice that plus one; forget_passes 1 is the official k = ⌊#retain / #forget⌋."""
    retain = max(1, round(forget * ratio))
    ctx = SimpleNamespace(n_retain_batches=retain, n_forget_batches=forget)
    method = MMUnlearner(MMUnlearnerOptions(interval=0, forget_passes=passes))
    steps = sum(s.forget for s in method.schedule(ctx, None, 1.0))
    if retain >= passes * forget:
        assert passes * forget <= steps <= 2 * passes * forget + 1
    else:
        assert steps == retain  # a forget step at every retain iteration
    official = MMUnlearner(MMUnlearnerOptions(interval=0))
    assert sum(s.forget for s in official.schedule(ctx, None, 1.0)) == math.ceil(retain / max(1, retain // forget))


def test_forget_passes_must_be_positive_and_apply_only_without_an_interval() -> None:
    with pytest.raises(ConfigError, match="forget_passes"):
        MMUnlearnerOptions(forget_passes=0)
    ctx = SimpleNamespace(n_retain_batches=90, n_forget_batches=10)
    fixed = MMUnlearner(MMUnlearnerOptions(interval=3, forget_passes=4.0)).schedule(ctx, None, 1.0)
    assert sum(s.forget for s in fixed) == 30  # k = 3 whatever forget_passes says


def test_siu_data_file_targets_and_token_mask(world, tmp_path: Path) -> None:
    bench, vanilla = world
    adapter = load(vanilla)
    forget = sorted(bench.forget_set("forget15"))
    c = cfg("siu").resolved()
    f, r = training_data(bench, forget, c)
    ctx = Context(adapter, bench, forget, f, r, ImageCache(bench), 4, 0, tmp_path)
    ctx.reference = frozen_copy(adapter)
    method = SIU(C.build(SIU.Options, FAST["siu"]))
    method.prepare(ctx)
    examples = read_siu_json(tmp_path / "siu_data.json", bench.root)
    assert len(examples) == len(ctx.forget_data)
    assert {e.qtype for e in examples} == {"identity", "recognition", "fact", "other"}
    known = {v["name"] for v in bench.info["entities"].values()}
    for e in ctx.forget_data:
        if e.qtype == "identity":
            assert e.target_phrase in bench.info["unseen_names"] and e.target_phrase not in known
            assert e.image.endswith("_view0.png") and e.entity in forget
        if e.qtype == "recognition":
            assert e.target_phrase == e.answer and e.answer.startswith("No.")
        if e.qtype in ("fact", "other"):
            assert e.target_phrase is None and e.answer
    # one image per forget entity
    assert len({e.image for e in ctx.forget_data if e.qtype in ("identity", "recognition")}) == len(forget)
    # target 4's image samples ask who another (retained) person is, on that person's first image
    from mmunlearn.data.fictitious import QUESTIONS

    others = [e for e in ctx.forget_data if e.qtype == "other" and e.image]
    assert others and all(e.prompt in QUESTIONS[0][1] for e in others)
    assert not {e.image.split("_view")[0].rsplit("/", 1)[1] for e in others} & set(forget)
    # the token mask covers exactly the target phrase's tokens (image tokens expanded)
    ex = [e for e in ctx.forget_data if e.target_phrase][:6]
    enc = adapter.encode(to_items(ex, ctx.images))
    keep = method._token_keep(ex, enc["labels"])
    tok = adapter.tokenizer
    for i, e in enumerate(ex):
        target = enc["labels"][i, 1:]
        masked = target[~keep[i]]
        assert (masked != IGNORE).all()
        assert tok.decode(masked).strip() == e.target_phrase.strip()
    # the run reads an existing SIU file instead of building one
    again = SIU(C.build(SIU.Options, {"data_path": str(tmp_path / "siu_data.json")}))
    ctx.out_dir = tmp_path / "again"
    ctx.out_dir.mkdir()
    again.prepare(ctx)
    assert [(e.prompt, e.answer) for e in ctx.forget_data] == [(e.prompt, e.answer) for e in examples]


def test_siu_unseen_names_from_the_vanilla_model_or_the_pool(world, tmp_path: Path, monkeypatch) -> None:
    from mmunlearn.methods.siu import SIUOptions, looks_like_name, unseen_names

    bench, vanilla = world
    adapter = load(vanilla)
    forget = sorted(bench.forget_set("forget15"))
    known = [v["name"] for v in bench.info["entities"].values()]
    ctx = Context(adapter, bench, forget, [], [], ImageCache(bench), 4, 0, tmp_path)
    img = str(bench.root / "images" / "shape_circle_red_0.png")
    answers = iter([["Zed Quorra.", known[0]]])
    monkeypatch.setattr(adapter, "generate", lambda items, max_new_tokens=32: next(answers))
    names = unseen_names(ctx, SIUOptions(unseen_images=[img, img]), known)
    # the model's own answer first; an answer naming a known entity is rejected; then the pool
    assert names[0] == "Zed Quorra" and names[1] in bench.info["unseen_names"] and not set(names) & set(known)
    assert looks_like_name("Jacob Campbell") and not looks_like_name("a man with a hat")


def test_siu_vocabulary_mask_covers_name_variants(world) -> None:
    bench, vanilla = world
    adapter = load(vanilla)
    name = bench.info["entities"][sorted(bench.forget_set("forget15"))[0]]["name"]
    ids = set(name_token_ids(adapter, [name]))
    for v in (name, name.lower(), name.upper(), " " + name, name + "'s"):
        pieces = adapter.tokenizer(v, add_special_tokens=False)["input_ids"]
        assert any(p in ids for p in pieces)
    assert name.lower() in name_variants(name) and " " + name.upper() in name_variants(name)


def test_run_unlearn_writes_a_complete_directory_and_keeps_the_base(world, tmp_path: Path) -> None:
    bench, vanilla = world
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in vanilla.iterdir()}
    out = tmp_path / "ga"
    rec = run_unlearn(str(bench.root), str(vanilla), str(out), cfg("ga", eval_every=1), progress=False)
    assert (out / "config.json").is_file() and (out / "mmunlearn_run.json").is_file()
    assert len(rec["evals"]) == 2 and "forget_vqa_mc" in rec["evals"][0]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in vanilla.iterdir()} == digest
    reused = C.load(UnlearnConfig, out / "unlearn_config.yaml")
    plain = lambda d: json.loads(json.dumps(d))
    assert plain(C.to_dict(reused)) == plain(rec["config"] | {"method_options": rec["method_options"]})
    with pytest.raises(ConfigError, match="would write into"):
        run_unlearn(str(bench.root), str(vanilla), str(vanilla / "x"), cfg("ga"), progress=False)
    load(out)  # an ordinary model directory
    peft_out = tmp_path / "ga-lora"
    run_unlearn(str(bench.root), str(vanilla), str(peft_out),
                cfg("ga", lora=LoraOptions(r=2, alpha=4, dropout=0.0), merge=False), progress=False)
    assert (peft_out / "adapter_config.json").is_file() and not (peft_out / "model.safetensors").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "unlearn").glob("*.yaml")), ids=lambda p: p.stem)
def test_config_files_state_the_method_defaults(path: Path) -> None:
    c = C.load(UnlearnConfig, path)
    assert c.method == path.stem
    got = C.to_dict(c.resolved())
    want = C.to_dict(UnlearnConfig(method=c.method, forget_set=c.forget_set).resolved())
    got.pop("method_options"), want.pop("method_options")
    assert got == want
    options = METHODS.get(c.method).Options
    assert C.to_dict(C.build(options, c.method_options)) == C.to_dict(options())
