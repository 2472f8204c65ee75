"""Evaluation results cached per (model, data, options, unit), so a long evaluation resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    if os.environ.get("MMUNLEARN_CACHE"):
        return Path(os.environ["MMUNLEARN_CACHE"]) / "eval"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmunlearn" / "eval"


def fingerprint(path: str | Path) -> str:
    """Identity of a model or data directory: names, sizes and modification times of its files (the
    verification files written beside a model do not change what it is)."""
    p = Path(path)
    if not p.exists():
        return f"missing:{p}"
    h = hashlib.sha256(str(p.resolve()).encode())
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and ".cache" not in f.parts
                                           and f.name not in ("verification.json", "verification.md"))
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# What a unit holds; part of every key, so results cached before a unit gained metrics (e.g. the retain VQA
# unit's held-out naming, MMUBench's informative flags) are computed again rather than reused without them.
LAYOUT = 2


class EvalCache:
    """One JSON file per evaluated unit under ``root/<key>/``; writes are atomic."""

    def __init__(self, root: str | Path, *key_parts: Any) -> None:
        key = hashlib.sha256(json.dumps([LAYOUT, *key_parts], sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.dir = Path(root) / key
        self.hits = 0

    def _path(self, unit: str) -> Path:
        return self.dir / f"{unit.replace('/', '_')}.json"

    def get(self, unit: str) -> Any | None:
        p = self._path(unit)
        if not p.is_file():
            return None
        try:
            value = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a torn write from an interrupted run: recompute
        self.hits += 1
        return value

    def put(self, unit: str, value: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self._path(unit)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(p)
