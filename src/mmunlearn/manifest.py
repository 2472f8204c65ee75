"""The run manifest: what a result was made from, in a form that can be checked later.

Every output (a finetune or unlearn model directory, an evaluate results file) gets ``manifest.json``
(``<results>.manifest.json`` beside a results file) holding the resolved configuration and seed, the
SHA-256 of every input file (benchmark files and images, the base model's files), of every output file,
the tool version and git commit, package versions, hardware and wall time. ``mmunlearn manifest check``
re-hashes inputs and outputs and lists each file that changed, went missing or appeared.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmunlearn import __version__
from mmunlearn.errors import ConfigError
from mmunlearn.outputs import OWNER_FILE, RESUME_DIR, read_json_object, write_json

MANIFEST = "manifest.json"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "pillow", "numpy", "datasets", "pyarrow")
SKIP_PARTS = (".cache", RESUME_DIR)  # not part of what a directory means
SKIP_NAMES = (MANIFEST, OWNER_FILE)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(path: str | Path) -> dict[str, str]:
    """Relative file name -> SHA-256 for a directory (recursively) or a single file."""
    p = Path(path)
    if p.is_file():
        return {p.name: sha256_file(p)}
    files = sorted(
        f for f in p.rglob("*")
        if f.is_file() and f.name not in SKIP_NAMES and not any(s in f.relative_to(p).parts for s in SKIP_PARTS)
    )
    return {f.relative_to(p).as_posix(): sha256_file(f) for f in files}


def inputs(data: str | Path | None, model: str | None) -> dict[str, Any]:
    """Hashes of the benchmark directory and of the base model's directory (``tiny`` has none: it is built)."""
    out: dict[str, Any] = {}
    if data is not None:
        out["data"] = {"path": str(Path(data).resolve()), "files": hash_tree(data)}
    if model is not None:
        if Path(model).is_dir():
            out["base_model"] = {"path": str(Path(model).resolve()), "files": hash_tree(model)}
        else:
            out["base_model"] = {"name": model, "files": {}}
    return out


def git_commit() -> dict[str, Any] | None:
    """The commit of the source tree this package runs from, if it is a git checkout (and whether it is dirty)."""
    root = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": rev, "dirty": bool(dirty)}


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "python": sys.version.split()[0], "packages": versions, "platform": platform.platform(),
        "hardware": {"machine": platform.machine(), "processor": platform.processor() or None,
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus},
    }


def write_manifest(
    target: str | Path, command: str, config: dict, seed: int | None, hashed_inputs: dict[str, Any],
    started: float, output_files: str | Path | list[Path] | None = None,
) -> Path:
    """Write the manifest of ``target`` (a directory: ``manifest.json`` inside; a file: beside it).

    ``output_files`` are the files the manifest vouches for (default: every file of the directory).
    """
    target = Path(target)
    path = target / MANIFEST if target.is_dir() else manifest_path(target)
    outputs: dict[str, str] = {}
    if isinstance(output_files, list):
        outputs = {f.name: sha256_file(f) for f in output_files}
    else:
        outputs = hash_tree(output_files or target)
    finished = time.time()
    manifest = {
        "tool": "mmunlearn", "version": __version__, "git": git_commit(), "command": command,
        "argv": sys.argv[1:], "config": config, "seed": seed, "inputs": hashed_inputs, "outputs": outputs,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished)),
        "wall_seconds": round(finished - started, 2), **environment(),
    }
    write_json(path, manifest)
    return path


def manifest_path(target: str | Path) -> Path:
    """``DIR/manifest.json`` for a directory, ``<stem>.manifest.json`` beside a results file."""
    t = Path(target)
    if t.is_dir() or t.name == MANIFEST:
        return t / MANIFEST if t.is_dir() else t
    if t.name.endswith("." + MANIFEST):
        return t
    return t.with_name(f"{t.stem}.{MANIFEST}")


def _compare(label: str, root: Path, recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(set(recorded) | set(current)):
        if name not in current:
            out.append(f"{label} {root / name}: missing (recorded sha256 {recorded[name][:12]}…)")
        elif name not in recorded:
            out.append(f"{label} {root / name}: not in the manifest")
        elif recorded[name] != current[name]:
            out.append(f"{label} {root / name}: sha256 {current[name][:12]}… differs from the recorded "
                       f"{recorded[name][:12]}…")
    return out


def check(target: str | Path) -> list[str]:
    """Re-hash a run's outputs and inputs; one line per mismatch (empty: everything is as recorded)."""
    path = manifest_path(target)
    if not path.is_file():
        raise ConfigError(f"{path}: no manifest (written by finetune, unlearn and evaluate --out)")
    m = read_json_object(path, what="manifest")
    if not isinstance(m.get("outputs"), dict) or not isinstance(m.get("inputs"), dict):
        raise ConfigError(f"{path}: not a run manifest (fields 'outputs' and 'inputs' missing)")
    problems = []
    if path.name == MANIFEST:
        root = path.parent
        current = hash_tree(root)
    else:
        root = path.parent
        current = {n: sha256_file(root / n) for n in m["outputs"] if (root / n).is_file()}
    problems += _compare("output", root, m["outputs"], current)
    for key, rec in m["inputs"].items():
        if not isinstance(rec, dict) or "path" not in rec:
            continue
        src = Path(rec["path"])
        if not src.exists():
            problems.append(f"input {key} {src}: does not exist")
            continue
        problems += _compare(f"input {key}", src, rec.get("files", {}), hash_tree(src))
    return problems


def summary(target: str | Path) -> str:
    m = json.loads(manifest_path(target).read_text())
    n_in = sum(len(v.get("files", {})) for v in m["inputs"].values())
    return f"{len(m['outputs'])} output and {n_in} input files match {manifest_path(target)}"
