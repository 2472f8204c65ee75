"""The one data schema every benchmark maps into, and its on-disk form (JSONL + PNG).

A benchmark directory holds ``examples.jsonl`` (one :class:`Example` per line), ``benchmark.json``
(name, forget sets, free metadata) and the images, referenced by paths relative to the directory.
``datasets.load_dataset("json", data_files=".../examples.jsonl")`` reads the examples as they are.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from mmunlearn.errors import DataError

Kind = Literal["vqa", "qa"]
Task = Literal["gen", "mc", "cloze"]
# "people": fictitious entities, forget or retain depending on the forget set; "test": held-out images
# of those entities (generality); "utility": unrelated knowledge; "real": real-world entities.
Split = Literal["people", "test", "utility", "real"]
Purpose = Literal["train", "eval"]

KINDS = ("vqa", "qa")
TASKS = ("gen", "mc", "cloze")
SPLITS = ("people", "test", "utility", "real")
PURPOSES = ("train", "eval")
EVAL_SPLITS = ("forget", "retain", "test", "utility", "real")


@dataclass
class Example:
    """One prompt/answer pair, with or without an image.

    ``task="mc"`` carries ``options`` and ``answer_index`` (``answer`` is the correct option's text);
    ``qtype`` names the question family (e.g. ``identity``), which metrics and SIU use.
    """

    id: str
    entity: str
    kind: str
    task: str
    prompt: str
    answer: str
    split: str
    purpose: str
    image: str | None = None
    options: list[str] | None = None
    answer_index: int | None = None
    qtype: str = ""
    target_phrase: str | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        for name, value, allowed in (
            ("kind", self.kind, KINDS),
            ("task", self.task, TASKS),
            ("split", self.split, SPLITS),
            ("purpose", self.purpose, PURPOSES),
        ):
            if value not in allowed:
                raise DataError(f"example {self.id!r}: field {name!r} is {value!r}, expected one of {allowed}")
        if (self.kind == "vqa") != (self.image is not None):
            raise DataError(f"example {self.id!r}: kind {self.kind!r} does not match image={self.image!r}")
        if self.task == "mc":
            if not self.options or self.answer_index is None or not 0 <= self.answer_index < len(self.options):
                raise DataError(f"example {self.id!r}: multiple choice needs options and a valid answer_index")

    def _check_types(self) -> None:
        """Field types as annotated (JSON can hold anything; a number where a path belongs fails late)."""
        for name in ("id", "entity", "kind", "task", "prompt", "answer", "split", "purpose", "qtype"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"example {self.id!r}: field {name!r} must be a string")
        for name in ("image", "target_phrase"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise DataError(f"example {self.id!r}: field {name!r} must be a string or null")
        if self.options is not None and not (
            isinstance(self.options, list) and all(isinstance(o, str) for o in self.options)
        ):
            raise DataError(f"example {self.id!r}: field 'options' must be a list of strings or null")
        if self.answer_index is not None and (type(self.answer_index) is not int):
            raise DataError(f"example {self.id!r}: field 'answer_index' must be an integer or null")
        if not isinstance(self.meta, dict):
            raise DataError(f"example {self.id!r}: field 'meta' must be an object")

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> Example:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DataError(f"{where}: unknown field(s) {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise DataError(f"{where}: {e}") from e
        except DataError as e:
            raise DataError(f"{where}: {e}") from e


@dataclass
class Benchmark:
    """Examples plus the named forget sets (lists of entity ids) and the directory images live in."""

    name: str
    root: Path
    examples: list[Example]
    forget_sets: dict[str, list[str]]
    info: dict = field(default_factory=dict)

    def forget_set(self, name: str) -> set[str]:
        if name not in self.forget_sets:
            raise DataError(
                f"{self.root}: forget set {name!r} does not exist; available: {', '.join(sorted(self.forget_sets))}"
            )
        return set(self.forget_sets[name])

    def select(
        self,
        split: str,
        forget: str | Iterable[str],
        purpose: str | None = None,
        kind: str | None = None,
        task: str | None = None,
    ) -> list[Example]:
        """Examples of one evaluation split (forget/retain/test/utility/real) under a forget set.

        ``forget`` is a forget-set name or an explicit collection of entity ids.
        """
        if split not in EVAL_SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {EVAL_SPLITS}")
        f = self.forget_set(forget) if isinstance(forget, str) else set(forget)

        def keep(e: Example) -> bool:
            if split == "forget":
                ok = e.split == "people" and e.entity in f
            elif split == "retain":
                ok = e.split == "people" and e.entity not in f
            elif split == "test":
                ok = e.split == "test" and e.entity in f
            else:
                ok = e.split == split
            return (
                ok
                and (purpose is None or e.purpose == purpose)
                and (kind is None or e.kind == kind)
                and (task is None or e.task == task)
            )

        return [e for e in self.examples if keep(e)]

    def entity_names(self) -> dict[str, str]:
        """Entity id -> display name (converted benchmarks keep ``info["names"]``, the built-in one
        ``info["entities"][id]["name"]``)."""
        names = {k: v for k, v in (self.info.get("names") or {}).items() if v}
        for k, v in (self.info.get("entities") or {}).items():
            if isinstance(v, dict) and v.get("name"):
                names.setdefault(k, v["name"])
        return names

    def image_path(self, e: Example) -> Path:
        """Resolve an example's image inside the benchmark directory, refusing paths that escape it."""
        if e.image is None:
            raise DataError(f"example {e.id!r} has no image")
        return self._resolve(e.image, f"example {e.id!r} field 'image'")

    def identity_views(self) -> dict[str, list[Path]]:
        """Entity id -> its question-free images (``info["identity_views"]``, the built-in benchmark's data for
        the tiny model's vision warm-up; empty for benchmarks without them)."""
        raw = self.info.get("identity_views") or {}
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise DataError(f"{self.root}: info 'identity_views' must map entity ids to lists of image paths")
        return {ent: [self._resolve(str(r), f"identity view of {ent!r}") for r in rels] for ent, rels in raw.items()}

    def _resolve(self, rel: str, where: str) -> Path:
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise DataError(f"{self.root}: {where} escapes the data directory: {rel}")
        if not p.is_file():
            raise DataError(f"{self.root}: {where} names a missing file: {rel}")
        return p

    def save(self) -> None:
        """Write examples.jsonl and benchmark.json atomically (temp file + rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in self.examples)
        _atomic_write(self.root / "examples.jsonl", lines)
        meta = {"name": self.name, "forget_sets": self.forget_sets, "info": self.info}
        _atomic_write(self.root / "benchmark.json", json.dumps(meta, indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, root: str | Path) -> Benchmark:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"benchmark directory does not exist: {root}")
        for name in ("benchmark.json", "examples.jsonl"):
            if not (root / name).is_file():
                raise DataError(f"{root}: missing {name} (create it with 'mmunlearn make-data')")
        try:
            meta = json.loads((root / "benchmark.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{root / 'benchmark.json'}: not valid JSON ({e})") from e
        examples = []
        try:
            lines = (root / "examples.jsonl").read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{root / 'examples.jsonl'}: not UTF-8 text (byte {e.start})") from e
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{root / 'examples.jsonl'} line {i}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(d, dict):
                raise DataError(f"{where}: expected a JSON object")
            examples.append(Example.from_dict(d, where))
        if not isinstance(meta, dict) or "forget_sets" not in meta:
            raise DataError(f"{root / 'benchmark.json'}: missing field 'forget_sets'")
        fs = meta["forget_sets"]
        if not isinstance(fs, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in fs.values()
        ):
            raise DataError(f"{root / 'benchmark.json'} field 'forget_sets': expected a mapping of name -> entity ids")
        if not isinstance(meta.get("info", {}), dict) or not isinstance(meta.get("name", ""), str):
            raise DataError(f"{root / 'benchmark.json'}: field 'info' must be an object and 'name' a string")
        return cls(meta.get("name", root.name), root, examples, meta["forget_sets"], meta.get("info", {}))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
