"""Checkpoints of an unfinished training run, so a run killed at any point resumes where it stopped.

A checkpoint lives in the run's temporary output directory (``<tmp>/.resume/step-<n>/``, see
``outputs.atomic_dir``) and holds everything the next step depends on:

* ``weights.safetensors``: the engine's trainable weights (full parameters, or the LoRA adapter) and any
  tensors the loop adds (``extra.safetensors``, e.g. the weights a warm-up changed outside the engine);
* ``engine.pt``: optimizer and scheduler state (tensors and numbers only; read back with
  ``torch.load(weights_only=True)``), ``rng.pt``: torch's CPU and CUDA generator states;
* ``state.json``: the step, data-stream positions, Python and NumPy generator states, the loop's logs, and
  the fingerprint (resolved configuration, hashes of the data and base model) a resume must match.

Method state that ``prepare`` writes beside the model (SIU data, MMUnlearner masks) is in the same temporary
directory and is read back by ``prepare`` on resume. A checkpoint directory is written under a temporary name
and renamed when complete, and older ones are removed after, so a kill during a save leaves the previous one.
Resumed runs draw the same batches and random numbers: on CPU the final weights are bit-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmunlearn.errors import CheckpointMismatch, ModelError, RunInterrupted
from mmunlearn.outputs import RESUME_DIR, write_json

STEP = re.compile(r"step-(\d+)")


@dataclass
class Checkpoint:
    step: int  # optimisation steps completed
    engine: dict[str, Any]
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (torch CPU/CUDA, Python, NumPy)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(tensors: dict[str, Any], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if tensors.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two JSON-like values differ, with both values (None when equal)."""
    show = lambda v: (repr(v)[:60] + "…") if len(repr(v)) > 60 else repr(v)
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                there, here = ("absent" if k not in a else show(a[k])), ("absent" if k not in b else show(b[k]))
                return f"{path}{k} is {there} there, {here} here"
            d = first_difference(a[k], b[k], f"{path}{k}.")
            if d:
                return d
        return None
    if a != b:
        return f"{path.rstrip('.')} is {show(a)} there, {show(b)} here"
    return None


class Checkpointer:
    """Saves a checkpoint every ``every`` steps and when SIGTERM / Ctrl-C asks the run to stop.

    ``fingerprint`` (JSON) identifies the run; a checkpoint made with a different one is refused.
    """

    def __init__(self, run_dir: str | Path, every: int, fingerprint: dict[str, Any]) -> None:
        self.root = Path(run_dir) / RESUME_DIR
        self.every = every
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.stop_signal: int | None = None

    # ---- reading ------------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        if not self.root.is_dir():
            return None
        done = [(int(m.group(1)), p) for p in self.root.iterdir()
                if (m := STEP.fullmatch(p.name)) and (p / "state.json").is_file()]
        return max(done)[1] if done else None

    def check(self) -> None:
        """CheckpointMismatch if the latest checkpoint belongs to another configuration, data or model."""
        path = self.latest()
        if path is None:
            return
        old = json.loads((path / "state.json").read_text())["fingerprint"]
        diff = first_difference(old, self.fingerprint)
        if diff:
            raise CheckpointMismatch(
                f"option --resume: the checkpoint {path} was made by another run ({diff}); resume with the same "
                "options, data and model, or start over without --resume"
            )

    def load(self) -> Checkpoint | None:
        path = self.latest()
        if path is None:
            return None
        self.check()
        try:
            state = json.loads((path / "state.json").read_text())
            weights = load_file(str(path / "weights.safetensors"))
            engine = torch.load(path / "engine.pt", weights_only=True, map_location="cpu")
            rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
            extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").is_file() else {}
        except (OSError, RuntimeError, ValueError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: checkpoint does not load ({' '.join(str(e).split())[:200]})") from e
        set_rng_state(rng, state["rng"])
        return Checkpoint(int(state["step"]), {**engine, "model": weights}, state, extra)

    # ---- writing ------------------------------------------------------------------------------------------
    def due(self, done: int, total: int) -> bool:
        """Save after ``done`` steps? Every ``every`` steps, and when a stop was requested (not after the last)."""
        if done >= total:
            return False
        return self.stop_signal is not None or (self.every > 0 and done % self.every == 0)

    def save(self, done: int, engine_state: dict[str, Any], state: dict[str, Any],
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write checkpoint ``done`` atomically (temporary name, then rename) and drop the older ones."""
        final = self.root / f"step-{done:08d}"
        part = self.root / f".step-{done:08d}.partial-{os.getpid()}"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        engine_state = dict(engine_state)
        save_file(engine_state.pop("model"), str(part / "weights.safetensors"))
        if tensors:
            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
                      str(part / "extra.safetensors"))
        rng = rng_state()
        torch.save(engine_state, part / "engine.pt")
        torch.save({"torch": rng.pop("torch"), "cuda": rng.pop("cuda")}, part / "rng.pt")
        write_json(part / "state.json", {"step": done, "fingerprint": self.fingerprint, "rng": rng, **state})
        if final.exists():
            shutil.rmtree(final)
        part.rename(final)
        for p in self.root.iterdir():
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
        return final

    # ---- stopping -----------------------------------------------------------------------------------------
    @contextmanager
    def signals(self) -> Iterator[None]:
        """While training: SIGTERM and Ctrl-C ask for a checkpoint and a clean stop after the current step
        (a second Ctrl-C stops at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def stop_if_requested(self, done: int, total: int) -> None:
        """After the checkpoint of step ``done``: raise RunInterrupted if a signal asked the run to stop."""
        if self.stop_signal is not None and done < total:
            name = signal.Signals(self.stop_signal).name
            raise RunInterrupted(
                f"stopped by {name} after step {done} of {total}; checkpoint saved in {self.root.parent} "
                "(run the same command with --resume to continue)", self.stop_signal,
            )
