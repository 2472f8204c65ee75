"""Atomic output directories: build in a temporary sibling, rename on success, never leave half a result.
Plus the JSON files the commands write and read back."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmunlearn.errors import ConfigError


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, protect: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block finishes without error.

    ``protect`` lists directories (e.g. the base model) that ``out`` must not be, nor lie inside.
    """
    out = Path(out).resolve()
    for p in protect:
        p = Path(p).resolve()
        if out == p or out.is_relative_to(p):
            raise ConfigError(f"output directory {out} would write into {p}; choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: object) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)


def read_json_object(path: str | Path, what: str = "results file", hint: str = "") -> dict:
    """A JSON object written by ``write_json``; ConfigError naming the file if it is missing or not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} does not exist: {p}")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({getattr(e, 'msg', e)})") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{p}: expected a JSON object{hint}, got {type(obj).__name__}")
    return obj
