"""Materialise a published benchmark (MLLMU-Bench, CLEAR, MMUBench) as one benchmark directory.

The published formats differ (parquet with embedded image bytes; LLaVA conversation JSON naming images
by absolute paths that exist only on the authors' machine). Everything downstream wants one thing: a
directory with ``examples.jsonl``, ``benchmark.json`` and image files (see :mod:`mmunlearn.data.schema`).
``convert`` builds that directory from the user's local copy of a benchmark, atomically.

The small helpers here (image store, parquet reader, ratio choice) are shared by the per-format modules
``mllmu``, ``clear`` and ``mmubench``; each of those exposes ``Options`` (a validated dataclass) and
``build(src, store, options) -> (examples, forget_sets, info)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import os
import re
import shutil
import tempfile
import unicodedata
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError, DataError

SOURCES = ("mllmu-bench", "clear", "mmubench")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def convert(
    source: str, src_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False, **opts: Any
) -> Benchmark:
    """Read ``source`` from ``src_path`` (the user's local copy) and write a benchmark directory ``out_dir``.

    ``opts`` are the source's options (fields of ``mllmu.Options``, ``clear.Options`` or
    ``mmubench.Options``). The directory is built beside ``out_dir`` and renamed into place only when
    complete, so a failure never leaves a half-written benchmark; an existing non-empty ``out_dir`` is
    replaced only with ``overwrite=True``.
    """
    module = _format_module(source)
    options = make_options(module.Options, opts, source)
    src = Path(src_path).expanduser()
    if not src.is_dir():
        raise DataError(f"{src}: {source} data directory does not exist (download it first; see docs/data.md)")
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: output path exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise DataError(f"{out}: output directory is not empty; pass overwrite=True to replace it")
    if src.resolve() == out.resolve() or out.resolve() in src.resolve().parents:
        raise DataError(f"{out}: output directory would contain the source data {src}; choose another one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        store = ImageStore(tmp)
        examples, forget_sets, info = module.build(src, store, options)
        _check_ids(examples, source)
        info = {"source": source, "source_path": str(src.resolve()), **info}
        info["counts"] = count_examples(examples)
        Benchmark(source, tmp, examples, forget_sets, info).save()
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Benchmark.load(out)


def _format_module(source: str) -> Any:
    # Imported here: the format modules import the helpers below from this module.
    from mmunlearn.data import clear, mllmu, mmubench

    modules = {"mllmu-bench": mllmu, "clear": clear, "mmubench": mmubench}
    if source not in modules:
        close = difflib.get_close_matches(source, SOURCES, n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown benchmark source {source!r};{hint} available: {', '.join(SOURCES)}")
    return modules[source]


def make_options(cls: type, opts: dict[str, Any], source: str) -> Any:
    """Build an options dataclass, refusing unknown keys with a suggestion (typos must not pass silently)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in opts:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown option {key!r} for {source};{hint} available: {', '.join(names)}")
    return cls(**opts)


def _check_ids(examples: list[Example], source: str) -> None:
    dup = [i for i, n in Counter(e.id for e in examples).items() if n > 1]
    if dup:
        raise DataError(f"{source}: duplicate example id {dup[0]!r} (a converter bug; please report it)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first and restored on failure."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def count_examples(examples: list[Example]) -> dict[str, int]:
    """Counts per ``split/purpose/kind/task``: a quick record in benchmark.json of what was converted."""
    c = Counter(f"{e.split}/{e.purpose}/{e.kind}/{e.task}" for e in examples)
    return dict(sorted(c.items()))


class ImageStore:
    """Writes each distinct image once, as ``images/<content hash>.png|.jpg`` under the benchmark root.

    Every image is decoded once with PIL before it is written, so a benchmark never references an image
    that does not open. PNG and JPEG bytes are kept as they are; other formats are re-encoded as PNG.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_hash: dict[str, str] = {}

    def add_bytes(self, data: bytes, where: str) -> str:
        """Store encoded image bytes; ``where`` names the file and field for errors. Returns the relative path."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DataError(f"{where}: image bytes must be binary, got {type(data).__name__}")
        data = bytes(data)
        key = hashlib.sha256(data).hexdigest()[:24]
        if key in self._by_hash:
            return self._by_hash[key]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is refused, not decoded
                with Image.open(io.BytesIO(data)) as im:
                    fmt = im.format
                    im.load()
                    if fmt in ("PNG", "JPEG", "MPO"):
                        ext, payload = (".png", data) if fmt == "PNG" else (".jpg", data)
                    else:
                        buf = io.BytesIO()
                        im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
                        ext, payload = ".png", buf.getvalue()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            reason = "not a known image format" if isinstance(e, UnidentifiedImageError) else one_line(e)
            raise DataError(f"{where}: image bytes do not decode as an image ({reason})") from e
        rel = f"images/{key}{ext}"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        self._by_hash[key] = rel
        return rel

    def add_file(self, path: Path, where: str) -> str:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{where}: cannot read image {path} ({e})") from e
        return self.add_bytes(data, where)

    def add_hf_image(self, value: Any, data_root: Path, where: str) -> str:
        """Store a Hugging Face ``Image`` cell (``{"bytes": ..., "path": ...}``) from a parquet file.

        Published parquet files embed the bytes; a cell with only a path is resolved inside ``data_root``.
        """
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, bytes):
            data, path = value, None
        else:
            raise DataError(f"{where}: expected an image {{bytes, path}}, got {type(value).__name__}")
        if data:
            return self.add_bytes(data, where)
        if path:
            return self.add_file(resolve_inside(data_root, str(path), where), where)
        raise DataError(f"{where}: image has neither bytes nor a path")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (errors reach the user as a single line)."""
    return " ".join(str(e).split())


def resolve_inside(root: Path, name: str, where: str) -> Path:
    """``root / name`` if it stays inside ``root`` and exists; otherwise a DataError naming ``where``."""
    base = root.resolve()
    p = (base / name).resolve()
    if not p.is_relative_to(base):
        raise DataError(f"{where}: image path {name!r} escapes the data directory {root}")
    if not p.is_file():
        raise DataError(f"{where}: image {name!r} does not exist in {root}")
    return p


def parquet_files(src: Path, names: Sequence[str]) -> list[Path] | None:
    """The parquet shards of the first subset directory in ``names`` that exists under ``src`` (sorted).

    Handles the hub layout (``<subset>/train-00000-of-00002.parquet``) and the converted-parquet branch
    layout (``<subset>/train/0000.parquet``). None when no such directory holds parquet files.
    """
    for name in names:
        d = src / name
        if d.is_dir():
            files = sorted(d.rglob("*.parquet"))
            if files:
                return files
    return None


def require_parquet(src: Path, names: Sequence[str], what: str) -> list[Path]:
    files = parquet_files(src, names)
    if files is None:
        tried = " or ".join(str(src / n) for n in names)
        raise DataError(f"{src}: missing subset {names[0]!r} ({what}): expected parquet files under {tried}")
    return files


def read_forget_sets(
    src: Path, ratios: Sequence[int], subset: Callable[[int], str], column: str,
    entity_of: Callable[[str, dict], str],
) -> dict[str, list[str]]:
    """``forgetXX`` -> the entity ids of the published forget subset for XX %, in file order, once each."""
    forget_sets = {}
    for r in ratios:
        files = require_parquet(src, [subset(r)], f"forget set of {r}%")
        members: list[str] = []
        for where, row in read_parquet(files, [column]):
            entity = entity_of(where, row)
            if entity not in members:
                members.append(entity)
        forget_sets[f"forget{r:02d}"] = members
    return forget_sets


def read_parquet(
    files: Sequence[Path], required: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` for every row of ``files``, reading only the named columns, in small batches.

    ``where`` ("<file> row <i>") is for error messages. A missing required column is a DataError naming the
    file and the column.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
        except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: also undecodable metadata
            with open(f, "rb") as fh:
                head = fh.read(64)
            hint = " (a Git LFS pointer: fetch the file with 'git lfs pull')" if head.startswith(b"version ") else ""
            raise DataError(f"{f}: not a readable parquet file{hint} ({one_line(e)})") from e
        for col in required:
            if col not in names:
                raise DataError(f"{f}: missing column {col!r} (columns present: {', '.join(names)})")
        cols = list(required) + [c for c in optional if c in names]
        i = 0
        batches = pf.iter_batches(batch_size=32, columns=cols)
        while True:
            try:
                batch = next(batches, None)
                rows = [] if batch is None else batch.to_pylist()
            except (pa.ArrowException, OSError, ValueError) as e:  # a corrupt page inside a readable file
                raise DataError(f"{f} row {i}: not a readable parquet file ({one_line(e)})") from e
            if batch is None:
                break
            for row in rows:
                yield f"{f} row {i}", row
                i += 1


def pick_ratios(
    requested: Sequence[int | str] | None, published: Sequence[int], present: Sequence[int], where: Path
) -> list[int]:
    """The forget ratios to convert: the requested ones (each must be published) or every one present."""
    if requested is None:
        if not present:
            raise DataError(
                f"{where}: no forget subset found; published forget ratios: {', '.join(map(str, published))}"
            )
        return list(present)
    out = []
    for r in requested:
        value = parse_ratio(r)
        if value not in published:
            raise DataError(
                f"{where}: forget ratio {r!r} does not exist; available: {', '.join(map(str, published))}"
            )
        if value not in out:
            out.append(value)
    return out


def parse_ratio(r: int | str) -> int:
    """Accept 5, "5", "05", "forget05" or "forget_5"."""
    if isinstance(r, bool):
        raise ConfigError(f"forget ratio {r!r} is not a number")
    if isinstance(r, int):
        return r
    m = re.fullmatch(r"(?:forget_?)?0*(\d+)", str(r).strip())
    if not m:
        raise ConfigError(f"forget ratio {r!r} is not a number (write e.g. 5, '05' or 'forget05')")
    return int(m.group(1))


def slug(text: str) -> str:
    """A file- and id-friendly entity id from a name ("José Ortiz" -> "jose-ortiz")."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    s = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return s or "x" + hashlib.sha1(text.encode()).hexdigest()[:8]


class Ids:
    """Readable unique example ids: ``<prefix>-<n>`` with a counter per prefix."""

    def __init__(self) -> None:
        self._n: Counter[str] = Counter()

    def __call__(self, prefix: str) -> str:
        n = self._n[prefix]
        self._n[prefix] += 1
        return f"{prefix}-{n}"
