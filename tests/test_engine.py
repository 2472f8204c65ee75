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
