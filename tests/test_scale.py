"""The 7B-scale engine on tiny models: answer-position chunked losses, the in-optimizer masked update, fp32
masters for bf16 weights, the reference without a copy, packed masks, and mask names that must match."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmunlearn.commands import open_model
from mmunlearn.data.batches import BatchStream, ImageCache
from mmunlearn.errors import ConfigError
from mmunlearn.methods import answer_states as AS
from mmunlearn.methods import losses as L
from mmunlearn.methods import reference as R
from mmunlearn.methods.base import batch_states, forward_logits, labels_of
from mmunlearn.methods.siu import SIU
from mmunlearn.train.engine import Engine, LoraOptions, OptimConfig
from mmunlearn.train.finetune import training_examples
from mmunlearn.train.masks import PackedMask, clone_and_restore_step, masked_adamw_step

IGN = -100


def _case(seed: int = 0, b: int = 3, t: int = 9, h: int = 8, v: int = 37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    ref_hidden = torch.randn(b, t, h, generator=g)
    head = torch.nn.Linear(h, v, bias=False)
    ref_head = torch.nn.Linear(h, v, bias=False)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :4] = IGN  # prompt
    labels[1, 7:] = IGN  # padding
    keep = torch.rand(b, t - 1, generator=g) > 0.3
    return hidden, ref_hidden, head, ref_head, labels, keep


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("chunk", [1, 3, 0])
def test_chunked_answer_position_losses_equal_the_full_ones(chunk: int) -> None:
    hidden, ref_hidden, head, ref_head, labels, keep = _case()
    ref_logits = ref_head(ref_hidden).detach()
    ref = AS.select(ref_hidden, labels, ref_head, chunk=chunk)
    cases = [
        (lambda lg: L.answer_ce(lg, labels), lambda s: AS.ce(s)),
        (lambda lg: L.sequence_logprob(lg, labels).sum(), lambda s: AS.sequence_logprob(s).sum()),
        (lambda lg: L.kl_to_reference(ref_logits, lg, labels), lambda s: AS.kl(ref, s)),
        (lambda lg: L.dmk_loss(ref_logits, lg, labels, keep, [2, 5]), lambda s: AS.kl(ref, s, keep, [2, 5])),
        (lambda lg: L.dmk_loss(ref_logits, lg, labels, keep, [2, 5], renormalise=True),
         lambda s: AS.kl(ref, s, keep, [2, 5], renormalise=True)),
    ]
    for full_fn, chunked_fn in cases:
        full = full_fn(head(hidden))
        chunked = chunked_fn(AS.select(hidden, labels, head, chunk=chunk))
        torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
        g_full = _grad(full, hidden)
        torch.testing.assert_close(_grad(chunked_fn(AS.select(hidden, labels, head, chunk=chunk)), hidden), g_full,
                                   atol=1e-5, rtol=1e-5)


def test_per_row_log_probs_and_counts() -> None:
    hidden, _, head, _, labels, _ = _case(1)
    states = AS.select(hidden, labels, head, chunk=2)
    torch.testing.assert_close(AS.sequence_logprob(states), L.sequence_logprob(head(hidden), labels), atol=1e-5,
                               rtol=1e-5)
    assert AS.answer_token_counts(states).tolist() == (labels[:, 1:] != IGN).sum(1).tolist()


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_model_answer_states_equal_the_full_forward(family: str, small_bench) -> None:
    from mmunlearn.models import ADAPTERS
    from mmunlearn.models.base import Item
    from tiny_models import build_llava, build_qwen2_vl

    model, processor = (build_llava if family == "llava" else build_qwen2_vl)()
    adapter = ADAPTERS.get(family)(model, processor)
    images = ImageCache(small_bench)
    ex = [e for e in small_bench.examples if e.purpose == "train"][:3]
    batch = adapter.encode([Item(e.prompt, e.answer, images.get(e)) for e in ex])
    full = L.answer_ce(forward_logits(adapter, batch), labels_of(adapter, batch))
    torch.testing.assert_close(AS.ce(batch_states(adapter, batch)), full, atol=1e-5, rtol=1e-5)


def test_masked_update_equals_the_old_clone_and_restore() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))
    twin = copy.deepcopy(net)
    x, y = torch.randn(32, 16), torch.randn(32, 5)
    masks = {"0.weight": torch.rand(24, 16) > 0.5, "2.weight": torch.rand(5, 24) > 0.7}
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (net, twin)]
    for step in range(6):
        for m, opt in zip((net, twin), opts):
            opt.zero_grad()
            sign = -1.0 if step % 2 else 1.0  # ascent on "forget" steps, descent on "retain" steps
            (sign * ((m(x) - y) ** 2).mean()).backward()
        if step % 2:  # masked step
            clone_and_restore_step(opts[0], dict(net.named_parameters()), masks)
            packed = {dict(twin.named_parameters())[n]: PackedMask.pack(m) for n, m in masks.items()}
            masked_adamw_step(opts[1], packed, chunk=40)
        else:
            for opt in opts:
                opt.step()
    for (n, a), b in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6, msg=n)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opts[1].state[b][k], opts[0].state[a][k], atol=1e-9, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=70), st.integers(0, 8))
def test_packed_masks_round_trip(bits: list[bool], lo8: int) -> None:
    m = torch.tensor(bits)
    p = PackedMask.pack(m)
    assert p.bits.numel() == -(-len(bits) // 8) and p.count() == sum(bits)
    assert torch.equal(p.unpack(), m)
    lo = min(8 * lo8, len(bits) // 8 * 8)
    assert torch.equal(p.slice(lo, len(bits)), m[lo:])


def _stream(adapter, bench, seed: int = 0):
    return BatchStream(adapter, training_examples(bench), ImageCache(bench), batch_size=4, seed=seed)


def test_bf16_step_at_lr_1e5_moves_weights_as_fp32_does(small_bench) -> None:
    """fp32 masters: an lr 1e-5 AdamW step on a bf16 model changes the (master) weights as the fp32 computation
    does, within 5e-7 per entry (5 % of the step size) on 99 % of entries; rounded straight into bf16 the same
    step would leave most weights where they were."""
    fp32 = open_model("tiny", small_bench)
    bf16 = copy.deepcopy(fp32)
    bf16.model.to(torch.bfloat16)
    fp32.model.load_state_dict({k: v.float() for k, v in bf16.model.state_dict().items()})  # same start
    start = {n: p.detach().float().clone() for n, p in fp32.model.named_parameters()}
    cfg = OptimConfig(lr=1e-5, max_steps=1, trainable=("language",), scheduler="constant")
    engines = [Engine(a, cfg) for a in (fp32, bf16)]
    batch = next(_stream(fp32, small_bench))
    for a, e in zip((fp32, bf16), engines):
        e.step(lambda a=a: (AS.ce(batch_states(a, batch)), {}))
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    p32 = dict(fp32.model.named_parameters())[name]
    p16 = dict(bf16.model.named_parameters())[name]
    master = engines[1].masters.of(p16)
    assert master.dtype == torch.float32
    d32, d16 = p32.detach() - start[name], master.detach() - start[name]
    assert d32.abs().median() > 5e-6  # the step is about lr per entry
    close = ((d16 - d32).abs() <= 5e-7).float().mean()
    assert close >= 0.99
    assert torch.equal(p16.detach(), master.detach().to(torch.bfloat16))  # the model computes with the master
    naive_moved = ((start[name] + d32).to(torch.bfloat16) != start[name].to(torch.bfloat16)).float().mean()
    assert naive_moved < 0.5  # without masters most of the update rounds away


def test_disabled_adapter_reference_equals_a_deep_copy(small_bench) -> None:
    adapter = open_model("tiny", small_bench)
    copied = R.frozen_copy(adapter)
    engine = Engine(adapter, OptimConfig(lr=5e-2, max_steps=3, trainable=("language", "projector"),
                                         lora=LoraOptions(r=4, alpha=8, dropout=0.1)))
    stream = _stream(adapter, small_bench)
    for _ in range(3):
        engine.step(lambda: (AS.ce(batch_states(adapter, next(stream))), {}))
    disabled = R.adapters_disabled(adapter)
    batch = next(stream)
    got, want = disabled.states(batch), copied.states(batch)
    torch.testing.assert_close(got.logits(0, got.n), want.logits(0, want.n), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        trained = batch_states(adapter, batch)
        assert not torch.allclose(trained.logits(0, trained.n), want.logits(0, want.n), atol=1e-3)
    assert disabled.extra_bytes(adapter.model) == 0
    assert copied.extra_bytes(adapter.model) > 1_000_000
    assert adapter.model.training  # the reference pass left the trained model in train mode


def test_mask_name_that_matches_nothing_raises(small_bench) -> None:
    adapter = open_model("tiny", small_bench)
    engine = Engine(adapter, OptimConfig(max_steps=2, trainable=("language",)))
    batch = next(_stream(adapter, small_bench))
    fn = lambda: (AS.ce(batch_states(adapter, batch)), {})  # noqa: E731
    with pytest.raises(ConfigError, match="does not have"):
        engine.step(fn, {"model.language_model.layers.0.mlp.gate.weight": torch.ones(3, 3, dtype=torch.bool)})
    name = next(n for n, _ in adapter.model.named_parameters() if n.endswith("layers.0.mlp.fc1.weight"))
    with pytest.raises(ConfigError, match="not trained"):
        engine.step(fn, {name: torch.ones_like(dict(adapter.model.named_parameters())[name], dtype=torch.bool)})


def test_mask_names_resolve_through_a_peft_wrapper(small_bench) -> None:
    adapter = open_model("tiny", small_bench)
    engine = Engine(adapter, OptimConfig(lr=1e-2, max_steps=2, trainable=("language",), lora=LoraOptions(r=2)))
    params = dict(adapter.model.named_parameters())
    name = next(n for n in params if "lora_B" in n)
    base = engine.base_name(name)  # the name without PEFT's prefix reaches the same tensor
    m = torch.zeros_like(params[name], dtype=torch.bool)
    m[0] = True
    resolved = engine.resolve_mask({base: m})
    assert list(resolved) == [params[name]] and resolved[params[name]].count() == m.sum()


def test_gradient_checkpointing_gives_the_same_step(small_bench) -> None:
    a, b = open_model("tiny", small_bench), None
    b = copy.deepcopy(a)
    batch = next(_stream(a, small_bench))
    for adapter, on in ((a, False), (b, True)):
        e = Engine(adapter, OptimConfig(lr=1e-3, max_steps=1, gradient_checkpointing=on))
        assert e.gradient_checkpointing is on
        e.step(lambda adapter=adapter: (AS.ce(batch_states(adapter, batch)), {}))
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=n)


def test_paper_recipe_for_real_checkpoints_and_tiny_recipe_for_the_tiny_model(monkeypatch, small_bench, tmp_path):
    from mmunlearn.train import recipes
    from mmunlearn.train.unlearn import UnlearnConfig, unlearn

    fast = {"non_target_text": 1, "non_target_images": 0, "max_new_tokens": 4}
    adapter = open_model("tiny", small_bench)
    log = unlearn(adapter, small_bench, UnlearnConfig(method="siu", forget_set="forget15", steps=1,
                                                      method_options=fast), tmp_path / "a", progress=False)
    assert log["recipe"] == "tiny" and log["config"]["lora"] is None and log["config"]["lr"] == SIU.defaults["lr"]
    monkeypatch.setattr(recipes, "TINY_BELOW", 0)  # the tiny model now counts as a real checkpoint
    adapter = open_model("tiny", small_bench)
    log = unlearn(adapter, small_bench, UnlearnConfig(method="siu", forget_set="forget15", steps=1,
                                                      method_options=fast), tmp_path / "b", progress=False)
    c = log["config"]
    assert log["recipe"] == "paper" and log["reference"] == "adapters-disabled"
    assert c["lr"] == 3e-4 and c["group_lr"] == {"projector": 2e-5} and c["scheduler"] == "cosine"
    assert c["lora"]["r"] == 128 and c["lora"]["alpha"] == 256 and list(c["lora"]["groups"]) == ["language"]
    assert c["batch_size"] == 4 and c["warmup_ratio"] == 0.03
    trained = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    lora_modules = {n.split(".lora_")[0].split(".")[-1] for n in trained if "lora_" in n}
    assert lora_modules == set(adapter.lm_lora_targets)
    assert all("language_model" in n for n in trained if "lora_" in n)
    assert any("multi_modal_projector" in n and "lora_" not in n for n in trained)  # projector in full
    assert not any("vision_tower" in n for n in trained)
    log = unlearn(open_model("tiny", small_bench), small_bench,
                  UnlearnConfig(method="mmunlearner", forget_set="forget15", steps=1,
                                method_options={"importance_batches": 1}), tmp_path / "c", progress=False)
    assert log["recipe"] == "paper" and log["config"]["lr"] == 1e-5 and log["config"]["lora"] is None


def test_scoring_uses_the_current_cache_argument(small_bench) -> None:
    import warnings

    from mmunlearn.eval.scoring import rank_options

    adapter = open_model("tiny", small_bench)
    ex = [e for e in small_bench.examples if e.task == "mc"][:6]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rank_options(adapter, ex, ImageCache(small_bench))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_scale_bench_tiny_meets_the_memory_targets(tmp_path) -> None:
    """``bench/scale.py --tiny`` runs every measurement at small shapes and ends with the three figures."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "scale.py"), "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    last = run.stdout.strip().splitlines()[-3:]
    x = float(re.fullmatch(r"masked-update extra memory: ([\d.]+)% of trainable parameter bytes", last[0])[1])
    y = float(re.fullmatch(r"reference extra memory with LoRA: ([\d.]+) MB", last[1])[1])
    z = float(re.fullmatch(r"loss peak memory, chunked/full: ([\d.]+)", last[2])[1])
    assert x <= 10 and y <= 1 and z <= 0.25
    import json

    res = json.loads((tmp_path / "scale.json").read_text())
    assert res["masked_update"]["clone_and_restore"]["percent"] > 100 * 1.5  # what the clone cost before
    assert res["loss_memory"]["vocab"] == 152064
    for shape in res["shapes"].values():
        assert {r["method"] for r in shape["steps"]} == {"ga_diff", "kl_min", "npo", "siu", "mmunlearner"}
        assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in shape["steps"])
        assert {r["mode"] for r in shape["steps"] if r["method"] == "mmunlearner"} == {"full", "sparse"}
        assert shape["evaluation"]["speedup"] > 1
    assert (tmp_path / "scale.md").read_text().startswith("# Scale benchmark")


def test_sparse_entries_train_like_a_dense_update_mask_at_every_step(small_bench) -> None:
    """Optimizer state only for the masked entries gives the same weights as dense AdamW whose every step is
    confined to the mask; entries outside the mask never move; the state is 16 B per selected entry."""
    a = open_model("tiny", small_bench)
    b = copy.deepcopy(a)
    params = dict(a.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in params.items()
             if a.group_of(n) == "language" and p.dim() == 2 and "proj" in n}
    cfg = OptimConfig(lr=1e-2, max_steps=4, trainable=("language",), scheduler="constant", grad_clip=0.0)
    dense = Engine(a, cfg)
    sparse = Engine(b, cfg, trainable_masks=masks)
    start = {n: p.detach().clone() for n, p in params.items()}
    stream = _stream(a, small_bench)
    for i in range(4):
        batch = next(stream)
        sign = -1.0 if i % 2 else 1.0
        dense.step(lambda batch=batch, sign=sign: (sign * AS.ce(batch_states(a, batch)), {}), masks)
        sparse.step(lambda batch=batch, sign=sign: (sign * AS.ce(batch_states(b, batch)), {}))
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=n)
        if n in masks:
            assert torch.equal(q[~masks[n]], start[n][~masks[n]])
            assert (q[masks[n]] != start[n][masks[n]]).any()
        else:
            assert torch.equal(q, start[n]), n
    selected = sum(int(m.sum()) for m in masks.values())
    assert sparse.sparse.selected() == selected
    assert sparse.sparse.state_bytes() <= 16 * selected + sum(m.numel() for m in masks.values()) // 8 + len(masks)
    assert all(p.grad is None for p in b.model.parameters())  # the dense gradients were freed


def test_mmunlearner_sparse_state_keeps_everything_outside_the_mask(small_bench, tmp_path) -> None:
    from mmunlearn.train.unlearn import UnlearnConfig, unlearn

    adapter = open_model("tiny", small_bench)
    start = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    opts = {"importance_batches": 1, "state": "sparse"}
    log = unlearn(adapter, small_bench, UnlearnConfig(method="mmunlearner", forget_set="forget15", steps=3,
                                                      batch_size=4, method_options=opts), tmp_path, progress=False)
    from mmunlearn.methods.saliency import load_masks

    masks = {n: m.unpack() for n, m in load_masks(tmp_path / "masks.safetensors").items()}
    assert log["trainable_entries"] == sum(int(m.sum()) for m in masks.values())
    for n, p in adapter.model.named_parameters():
        if n in masks:
            assert torch.equal(p[~masks[n]], start[n][~masks[n]]), n
        else:
            assert torch.equal(p, start[n]), n
    assert any(not torch.equal(p, start[n]) for n, p in adapter.model.named_parameters())
