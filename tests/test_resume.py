"""Interrupted runs resume from their last checkpoint and end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmunlearn.cli import main
from mmunlearn.commands import benchmark_corpus
from mmunlearn.models.tiny import save_tiny
from mmunlearn.outputs import OWNER_FILE, RESUME_DIR

SRC = Path(__file__).resolve().parents[1] / "src"
# MMUnlearner: 15 retain iterations with a masked forget step every 3rd = 20 steps, a checkpoint every 4
MMU = ["--method", "mmunlearner", "--quiet", "--set", "steps=15", "--set", "save_every=4", "--set", "batch_size=4",
       "--set", "forget_set=forget15", "--set", "eval_every=10", "--set", "method_options.importance_batches=2"]


@pytest.fixture(scope="module")
def vanilla(small_bench, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vanilla") / "model"
    save_tiny(path, benchmark_corpus(small_bench))
    return path


def same_result(a: Path, b: Path) -> None:
    """Bit-identical weights, identical per-step logs and in-training evaluations, identical artefacts."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[0]}"
    ra, rb = (json.loads((d / "mmunlearn_run.json").read_text()) for d in (a, b))
    log_a, log_b = ra.get("log", ra), rb.get("log", rb)
    assert log_a["history"] == log_b["history"]
    assert log_a.get("evals") == log_b.get("evals")
    for name in ("masks.safetensors", "mask_stats.json"):
        if (a / name).is_file():
            assert (a / name).read_bytes() == (b / name).read_bytes()


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, capsys, small_bench, vanilla):
    base = ["unlearn", "--data", str(small_bench.root), "--model", str(vanilla)]
    assert main([*base, "--out", str(tmp_path / "straight"), *MMU]) == 0, capsys.readouterr().err

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "mmunlearn", *base, "--out", str(out), *MMU], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(tmp_path.glob(f".killed.tmp-*/{RESUME_DIR}/step-*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists() and len(leftovers(out)) == 1

    code = main([*base, "--out", str(out), *MMU, "--resume"])
    assert code == 0, capsys.readouterr().err
    assert not leftovers(out)
    assert not (out / RESUME_DIR).exists() and not (out / OWNER_FILE).exists()
    record = json.loads((out / "mmunlearn_run.json").read_text())
    assert record["resumed_at_step"] >= 4 and record["resumed_at_step"] % 4 == 0
    same_result(tmp_path / "straight", out)
    assert main(["manifest", "check", str(out)]) == 0


FT = ["--quiet", "--set", "steps=6", "--set", "vision_warmup_steps=2", "--set", "batch_size=4",
      "--set", "trainable=[projector, language]", "--set", "save_every=0", "--set", "log_every=1"]


def test_sigterm_saves_a_checkpoint_and_finetune_resumes(tmp_path, capsys, small_bench, monkeypatch):
    # vision is not trained by the engine here, so the warm-up's vision weights must come from the checkpoint
    data = str(small_bench.root)
    assert main(["finetune", "--data", data, "--out", str(tmp_path / "straight"), *FT]) == 0

    import mmunlearn.train.finetune as F

    real, calls = F.ce_loss, {"n": 0}

    def term_at_third_step(adapter, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGTERM)  # the handler only asks for a stop after this step
        return real(adapter, batch)

    out = tmp_path / "stopped"
    monkeypatch.setattr(F, "ce_loss", term_at_third_step)
    code = main(["finetune", "--data", data, "--out", str(out), *FT])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step 3 of 6" in err and "--resume" in err
    assert not out.exists() and len(leftovers(out)) == 1
    monkeypatch.setattr(F, "ce_loss", real)

    # a resume with other options is refused and keeps the checkpoint
    code = main(["finetune", "--data", data, "--out", str(out), *FT, "--set", "lr=0.5", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "config.lr is 0.0005 there, 0.5 here" in err, err
    assert len(leftovers(out)) == 1
    code = main(["finetune", "--data", data, "--out", str(out), *FT, "--dtype", "bfloat16", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "dtype is 'float32' there, 'bfloat16' here" in err, err
    assert len(leftovers(out)) == 1

    assert main(["finetune", "--data", data, "--out", str(out), *FT, "--resume"]) == 0
    assert not leftovers(out)
    assert json.loads((out / "mmunlearn_run.json").read_text())["log"]["resumed_at_step"] == 3
    same_result(tmp_path / "straight", out)


def test_resume_without_an_interrupted_run(tmp_path, capsys, small_bench):
    out = tmp_path / "m"
    code = main(["finetune", "--data", str(small_bench.root), "--out", str(out), *FT, "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "no interrupted run to resume" in err
    assert not out.exists() and not leftovers(out)


def test_temporary_directories_of_dead_runs_are_removed(tmp_path, capsys, small_bench):
    done = subprocess.Popen(["true"])
    done.wait()
    stale = tmp_path / ".m.tmp-dead"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(json.dumps({"pid": done.pid}))
    (stale / "model.safetensors").write_bytes(b"half")
    out = tmp_path / "m"
    assert main(["finetune", "--data", str(small_bench.root), "--out", str(out), *FT]) == 0
    assert not stale.exists() and not leftovers(out)
    assert (out / "model.safetensors").is_file()


def test_batch_stream_state_round_trip(small_bench):
    from mmunlearn.commands import open_model
    from mmunlearn.data.batches import BatchStream, ImageCache
    from mmunlearn.train.finetune import training_examples

    adapter = open_model("tiny", small_bench)
    ex = training_examples(small_bench)[:10]
    a = BatchStream(adapter, ex, ImageCache(small_bench), batch_size=3, seed=5)
    for _ in range(4):  # into the second epoch (3 batches per epoch)
        a.next_examples()
    state = json.loads(json.dumps(a.state_dict()))
    b = BatchStream(adapter, ex, ImageCache(small_bench), batch_size=3, seed=99)
    b.load_state_dict(state)
    for _ in range(7):
        assert [e.id for e in a.next_examples()] == [e.id for e in b.next_examples()]
    assert a.epoch == b.epoch == 3


def test_engine_state_round_trip_with_lora_and_dropout(tmp_path, small_bench):
    """Checkpointer + Engine.state_dict: 2 steps, save, 2 steps == 2 steps, load into a fresh engine, 2 steps
    (LoRA dropout draws from the torch generator, which the checkpoint restores)."""
    from mmunlearn.checkpoint import Checkpointer
    from mmunlearn.commands import open_model
    from mmunlearn.data.batches import BatchStream, ImageCache
    from mmunlearn.train.engine import Engine, LoraOptions, OptimConfig
    from mmunlearn.train.finetune import ce_loss, training_examples

    cfg = OptimConfig(lr=1e-2, max_steps=4, trainable=("language",), scheduler="cosine",
                      lora=LoraOptions(r=4, dropout=0.5))

    def setup():
        adapter = open_model("tiny", small_bench)
        engine = Engine(adapter, cfg, seed=1)
        return adapter, engine, BatchStream(adapter, training_examples(small_bench), ImageCache(small_bench), 4)

    ck = Checkpointer(tmp_path, every=2, fingerprint={"test": 1})
    adapter, engine, stream = setup()
    for step in range(4):
        engine.step(lambda: (ce_loss(adapter, next(stream)), {}))
        if step == 1:
            ck.save(2, engine.state_dict(), {"streams": {"train": stream.state_dict()}})
    want = {n: p.detach().clone() for n, p in engine.trainable_parameters().items()}

    adapter, engine, stream = setup()
    loaded = ck.load()
    engine.load_state_dict(loaded.engine)
    stream.load_state_dict(loaded.state["streams"]["train"])
    assert loaded.step == 2 and engine.global_step == 2
    for _ in range(2):
        engine.step(lambda: (ce_loss(adapter, next(stream)), {}))
    got = engine.trainable_parameters()
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert engine.global_step == 4
