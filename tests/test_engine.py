import torch
from transformers import LlavaForConditionalGeneration

from mmunlearn.commands import export, open_model
from mmunlearn.data.batches import BatchStream, ImageCache
from mmunlearn.train.engine import Engine, LoraOptions, OptimConfig
from mmunlearn.train.finetune import ce_loss, training_examples


def _stream(adapter, bench):
    return BatchStream(adapter, training_examples(bench), ImageCache(bench), batch_size=4)


def test_full_training_moves_only_trainable_groups(small_bench):
    adapter = open_model("tiny", small_bench)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    engine = Engine(adapter, OptimConfig(lr=1e-2, max_steps=2, trainable=("projector",)))
    stream = _stream(adapter, small_bench)
    for _ in range(2):
        engine.step(lambda: (ce_loss(adapter, next(stream)), {}))
    for n, p in adapter.model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == (adapter.group_of(n) == "projector"), n


def test_lora_trains_adapters_and_exports_merged(tmp_path, small_bench):
    adapter = open_model("tiny", small_bench)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    engine = Engine(adapter, OptimConfig(lr=1e-2, max_steps=2, trainable=("language",), lora=LoraOptions(r=4)))
    trainable = engine.trainable_parameters()
    assert trainable and all("lora_" in n for n in trainable)
    stream = _stream(adapter, small_bench)
    for _ in range(2):
        engine.step(lambda: (ce_loss(adapter, next(stream)), {}))
    batch = adapter.to_device(next(stream))
    batch.pop("answer_start")
    batch.pop("labels")
    adapter.model.eval()
    with torch.no_grad():
        want = adapter.model(**batch).logits
    export(adapter, tmp_path / "merged", merge=True)
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").to(want.device).eval()
    with torch.no_grad():
        got = plain(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the merged weights differ from the starting ones only in the language model
    merged = dict(plain.named_parameters())
    changed = {adapter.group_of(n) for n, p in before.items() if not torch.equal(p, merged[n].detach())}
    assert changed == {"language"}


def test_lora_export_as_adapter(tmp_path, small_bench):
    adapter = open_model("tiny", small_bench)
    Engine(adapter, OptimConfig(max_steps=1, lora=LoraOptions(r=2)))
    export(adapter, tmp_path / "peft", merge=False)
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_dtype_step_bench_times_the_fine_tuning_step_in_both_dtypes(small_bench):
    """``bench/dtype_step.py`` times the vanilla fine-tune's step in float32 and bfloat16 weights and prints both
    and their ratio."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "dtype_step.py"), "--data", str(small_bench.root),
                          "--model", "tiny", "--steps", "2", "--batch-size", "4"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    m = re.search(r"float32 ([\d.]+) s/step, bfloat16 ([\d.]+) s/step, ratio ([\d.]+)", run.stdout)
    assert m and float(m[1]) > 0 and float(m[2]) > 0, run.stdout


def test_fused_adamw_on_the_cpu_trains_like_the_for_loop_step(small_bench, monkeypatch):
    """From ``FUSED_CPU_FROM`` parameters on (the smol model) the CPU's AdamW is fused: the same weights as the
    for-loop step within float tolerance, masked ``update`` steps included (entries outside the mask, moments
    too, stay put); the tiny model keeps the for-loop step."""
    import copy

    from mmunlearn.train import engine as E

    a = open_model("tiny", small_bench)
    b = copy.deepcopy(a)
    cfg = OptimConfig(lr=1e-2, max_steps=4, trainable=("language",), scheduler="constant")
    loop = Engine(a, cfg)
    assert not loop.fused
    monkeypatch.setattr(E, "FUSED_CPU_FROM", 0)
    fused = Engine(b, cfg)
    assert fused.fused and fused.torch_optimizer.defaults["fused"]
    params = dict(a.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in params.items()
             if a.group_of(n) == "language" and p.dim() == 2 and "proj" in n}
    stream = _stream(a, small_bench)
    for i in range(4):
        batch = next(stream)
        mask = masks if i % 2 else None  # masked ascent steps between plain descent steps
        sign = -1.0 if i % 2 else 1.0
        before = {n: p.detach().clone() for n, p in b.model.named_parameters()}
        loop.step(lambda batch=batch, sign=sign: (sign * ce_loss(a, batch), {}), mask)
        fused.step(lambda batch=batch, sign=sign: (sign * ce_loss(b, batch), {}), mask)
        if mask:
            for n, p in b.model.named_parameters():
                if n in mask:
                    assert torch.equal(p.detach()[~mask[n]], before[n][~mask[n]]), n
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=n)
