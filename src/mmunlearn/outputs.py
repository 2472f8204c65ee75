"""Atomic output directories: build in a temporary sibling, rename on success, never leave half a result.
Plus the JSON files the commands write and read back.

The temporary sibling is ``.<name>.tmp-<random>`` and records its owner's process id. A run killed outright
(SIGKILL, power loss) leaves it behind; ``resume=True`` reuses the newest one that holds a checkpoint, and a
fresh run removes those whose owner is gone. A sibling is never taken for an output: only the final rename
makes ``<name>``, and the checkpoint and owner files are removed before it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmunlearn.errors import CheckpointMismatch, ConfigError, RunInterrupted

OWNER_FILE = ".owner.json"
RESUME_DIR = ".resume"  # the checkpoints of an unfinished run (see mmunlearn.checkpoint)
FRESH_SECONDS = 60  # a sibling without an owner file this young may still be starting up


def check_output_dir(out: str | Path, overwrite: bool = False, protect: tuple[str | Path, ...] = ()) -> Path:
    """``out`` resolved, if it may be written: not inside ``protect`` (e.g. the base model, the data), and
    empty or absent unless ``overwrite``."""
    out = Path(out).resolve()
    for p in protect:
        p = Path(p).resolve()
        if out == p or out.is_relative_to(p):
            raise ConfigError(f"option --out: output directory {out} would write into {p}; choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(
            f"option --out: output directory {out} exists and is not empty (pass --overwrite to replace it)"
        )
    return out


def temp_siblings(out: Path) -> list[Path]:
    """The temporary directories of earlier runs into ``out``, newest first."""
    found = [p for p in out.parent.glob(f".{out.name}.tmp-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def owner_alive(tmp: Path) -> bool:
    """Whether the process that made ``tmp`` still runs (a young directory without an owner file counts)."""
    try:
        pid = int(json.loads((tmp / OWNER_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return time.time() - tmp.stat().st_mtime < FRESH_SECONDS and not (tmp / RESUME_DIR).exists()
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(tmp: Path) -> None:
    write_json(tmp / OWNER_FILE, {"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})


@contextmanager
def atomic_dir(
    out: str | Path, overwrite: bool = False, protect: tuple[str | Path, ...] = (), resume: bool = False
) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block finishes without error.

    ``protect`` lists directories (e.g. the base model) that ``out`` must not be, nor lie inside. With
    ``resume`` the temporary directory of an interrupted run (one holding a checkpoint) is reused; without it,
    leftovers of dead runs are removed. On RunInterrupted (and CheckpointMismatch) the temporary directory is
    kept for ``--resume``; on any other error it is removed.
    """
    out = check_output_dir(out, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    dead = [t for t in temp_siblings(out) if not owner_alive(t)]
    tmp = None
    if resume:
        busy = [t for t in temp_siblings(out) if t not in dead and (t / RESUME_DIR).is_dir()]
        if busy:
            raise ConfigError(f"option --resume: another run is still writing {busy[0]}; wait for it or stop it")
        ready = [t for t in dead if (t / RESUME_DIR).is_dir()]
        if not ready:
            raise ConfigError(f"option --resume: no interrupted run to resume for {out} (run without --resume)")
        tmp = ready[0]
    for t in dead:
        if t != tmp:
            shutil.rmtree(t, ignore_errors=True)
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _claim(tmp)
    try:
        yield tmp
        shutil.rmtree(tmp / RESUME_DIR, ignore_errors=True)
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except (RunInterrupted, CheckpointMismatch):  # the checkpoint stays for --resume
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def rank_zero_dir(
    out: str | Path, overwrite: bool = False, protect: tuple[str | Path, ...] = (), resume: bool = False
) -> Iterator[Path]:
    """``atomic_dir`` on rank 0 (the only writer of ``out``); with several processes the other ranks work in a
    private scratch directory that is removed afterwards, and every rank leaves the block only when all have
    finished it, with the same error if any rank failed (so rank 0 then removes its temporary directory)."""
    from mmunlearn import distributed as D

    if D.world() == 1:
        with atomic_dir(out, overwrite=overwrite, protect=protect, resume=resume) as tmp:
            yield tmp
        return
    if resume:  # several processes keep no checkpoints (a sharded model's state is spread over the ranks)
        def refuse() -> None:
            raise ConfigError("option --resume continues a run on one process; several processes start it afresh")

        D.agree(refuse)  # every rank raises it, rank 0 prints it
    if D.is_main():
        cm = atomic_dir(out, overwrite=overwrite, protect=protect)
    else:
        cm = tempfile.TemporaryDirectory(prefix=f".mmunlearn-rank{D.rank()}-")
    with cm as tmp:
        failure: Exception | None = None
        try:
            yield Path(tmp)
        except Exception as e:  # reported to the other ranks below
            failure = e

        def finished() -> None:
            if failure is not None:
                raise failure

        D.agree(finished)
    D.barrier()


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
