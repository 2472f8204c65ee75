"""DeepSpeed ZeRO-3 through accelerate on the CPU (2 processes, gloo): the same run as one process with gradient
accumulation 2. Runs only where deepspeed is installed (``pip install deepspeed``, an optional dependency)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ["--set", "steps=3", "--set", "batch_size=4", "--set", "vision_warmup_steps=2", "--set", "save_every=0"]
UNLEARN = ["--method", "ga_diff", "--set", "forget_set=forget15", "--set", "steps=3", "--set", "batch_size=4"]


def _config(tmp: Path) -> Path:
    """The shipped ZeRO-3 recipe, for 2 processes in fp32."""
    text = (ROOT / "configs/accelerate/zero3_8gpu.yaml").read_text()
    out = tmp / "zero3_2cpu.yaml"
    out.write_text(text.replace("num_processes: 8", "num_processes: 2").replace("mixed_precision: bf16",
                                                                                 'mixed_precision: "no"'))
    return out


def _launch(cfg: Path, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    # a hang (ranks waiting for each other's parameter gathers) shows up as the timeout
    subprocess.run([accelerate, "launch", "--config_file", str(cfg), "-m", "mmunlearn", *args, "--quiet"],
                   check=True, env=env, timeout=600, cwd=cfg.parent)


def _compare(a_dir: Path, b_dir: Path) -> tuple[float, float]:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert set(a) == set(b)
    worst, total, close = 0.0, 0, 0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        worst, total, close = max(worst, float(d.max())), total + d.numel(), close + int((d <= 1e-5).sum())
    return worst, close / total


def _history(d: Path) -> list[float]:
    rec = json.loads((d / "mmunlearn_run.json").read_text())
    return [h["loss"] for h in (rec["log"]["history"] if "log" in rec else rec["history"])]


def test_zero3_finetune_and_unlearn_equal_one_process(tmp_path, small_bench):
    """Text-only and image micro-batches mix on the ranks (the vision tower is touched on text-only ones):
    the run must neither hang nor differ from one process."""
    from mmunlearn.cli import main

    cfg, data = _config(tmp_path), str(small_bench.root)
    _launch(cfg, ["finetune", "--data", data, "--out", str(tmp_path / "ft"), *FINETUNE])
    assert main(["finetune", "--data", data, "--out", str(tmp_path / "ft1"), *FINETUNE,
                 "--set", "gradient_accumulation=2", "--quiet"]) == 0
    assert _history(tmp_path / "ft") == pytest.approx(_history(tmp_path / "ft1"), abs=1e-4)
    worst, close = _compare(tmp_path / "ft", tmp_path / "ft1")
    # AdamW's update lr·m/(√v + ε) turns a different summation order of near-zero gradients (embedding rows of
    # tokens a batch barely touches) into a visible fraction of lr; everywhere else the runs agree to 1e-5
    assert close >= 0.99 and worst <= 0.5 * 1e-3, (worst, close)
    _launch(cfg, ["unlearn", "--data", data, "--model", str(tmp_path / "ft1"), "--out", str(tmp_path / "gd"),
                  *UNLEARN])
    assert main(["unlearn", "--data", data, "--model", str(tmp_path / "ft1"), "--out", str(tmp_path / "gd1"),
                 *UNLEARN, "--set", "gradient_accumulation=2", "--quiet"]) == 0
    assert _history(tmp_path / "gd") == pytest.approx(_history(tmp_path / "gd1"), abs=1e-4)
    worst, close = _compare(tmp_path / "gd", tmp_path / "gd1")
    assert close >= 0.99 and worst <= 0.5 * 5e-4, (worst, close)
    start = load_file(tmp_path / "ft1" / "model.safetensors")
    after = load_file(tmp_path / "gd" / "model.safetensors")
    assert any(not (after[k] == start[k]).all() for k in start)  # the ZeRO-3 unlearning did train
