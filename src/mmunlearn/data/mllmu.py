"""MLLMU-Bench (hub dataset ``MLLMMU/MLLMU-Bench``) read from the user's local copy.

Layout of the hub repository (one directory per subset, parquet shards inside, e.g.
``Full_Set/train-00000-of-00001.parquet``, ``Test_Set/train-0000{0,1}-of-00002.parquet``):

- ``Full_Set`` (500 fictitious profiles), ``forget_5/10/15`` and ``retain_95/90/85`` (the same rows split by
  person), ``Test_Set`` (the same people; adds ``images``, a list of held-out images), ``Retain_Set`` (153 real
  celebrities), ``ft_Data`` (fine-tuning data for the vanilla model).
- Evaluation columns: ``image`` {bytes, path}, ``ID``, ``biography`` (a JSON string with ``Name``, ...),
  ``Classification_Task`` {``Image_Textual_Questions``, ``Pure_Text_Questions``: [{``Question``,
  ``Options`` {A..D}, ``Correct_Answer``}]}, ``Generation_Task`` and ``Mask_Task`` [{``Question``,
  ``Ground_Truth``, ``Type``}] where ``Type`` is ``Image_Textual`` (asked with the image) or ``Pure_Text``;
  Mask_Task questions mark the blank with ``__``.
- Training rows: ``image``, ``ID`` and ``metadata`` (a JSON string: [{``Question``, ``Answer``}]); newer
  uploads carry one ``question``/``answer`` pair per row instead.

Mapping: Full_Set questions -> split "people" (purpose "eval"); Test_Set -> "test" (image questions asked
on the held-out images, cycling through them); Retain_Set -> "real" (entity ``real-<ID>``); training
pairs -> purpose "train"; forget sets ``forget05/10/15`` list the IDs of forget_5/10/15. The retain side of a
forget set is everyone else in "people", as in retain_95/90/85.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmunlearn.data.convert import (
    Ids,
    ImageStore,
    parquet_files,
    pick_ratios,
    read_forget_sets,
    read_parquet,
    require_parquet,
)
from mmunlearn.data.schema import Example
from mmunlearn.errors import ConfigError, DataError

PUBLISHED_FORGET = (5, 10, 15)
TYPE_KIND = {"Image_Textual": "vqa", "Pure_Text": "qa"}
MC_KEYS = (("Image_Textual_Questions", "vqa"), ("Pure_Text_Questions", "qa"))
EVAL_COLUMNS = ("image", "ID", "Classification_Task", "Generation_Task", "Mask_Task")


@dataclass
class Options:
    """Options of ``convert("mllmu-bench", ...)``.

    forget_ratios: which published forget sets (5, 10, 15) to convert; None = every one present locally.
    train_path: the fine-tuning data (a parquet file or a directory of them, columns ``image``, ``ID``,
        ``metadata``); None = ``<src>/ft_Data`` when it exists, else no training examples.
    """

    forget_ratios: Sequence[int | str] | None = None
    train_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.forget_ratios, (str, int)):
            self.forget_ratios = [self.forget_ratios]
        if self.train_path is not None and not isinstance(self.train_path, (str, Path)):
            raise ConfigError(f"option 'train_path' must be a path, got {self.train_path!r}")


def build(src: Path, store: ImageStore, opt: Options) -> tuple[list[Example], dict[str, list[str]], dict]:
    present = [r for r in PUBLISHED_FORGET if parquet_files(src, [f"forget_{r}"])]
    ratios = pick_ratios(opt.forget_ratios, PUBLISHED_FORGET, present, src)
    ids = Ids()
    names: dict[str, str] = {}
    examples: list[Example] = []

    people_files = parquet_files(src, ["Full_Set"])
    if people_files is None:  # early uploads had no Full_Set: a forget/retain pair covers everyone
        for r in ratios:
            pair = [parquet_files(src, [f"forget_{r}"]), parquet_files(src, [f"retain_{100 - r}"])]
            if all(pair):
                people_files = pair[0] + pair[1]
                break
        else:
            require_parquet(src, ["Full_Set"], "all fictitious profiles")
    seen: set[str] = set()
    for where, row in read_parquet(people_files, EVAL_COLUMNS, optional=("biography",)):
        entity = _id(row, where)
        if entity in seen:
            continue
        seen.add(entity)
        names[entity] = _name(row, where)
        image = store.add_hf_image(row["image"], src, f"{where} field 'image'")
        examples += _questions(row, where, entity, "people", lambda image=image: image, ids)

    def profile(where: str, row: dict) -> str:
        entity = _id(row, where)
        if entity not in names:
            raise DataError(f"{where} field 'ID': {entity!r} is not one of the profiles in Full_Set")
        return entity

    forget_sets = read_forget_sets(src, ratios, lambda r: f"forget_{r}", "ID", profile)

    test_files = require_parquet(src, ["Test_Set"], "held-out images of the same people")
    for where, row in read_parquet(test_files, (*EVAL_COLUMNS[1:], "images")):
        entity = _id(row, where)
        examples += _questions(row, where, entity, "test", _cycle_images(row, src, store, where), ids)

    real_files = require_parquet(src, ["Retain_Set"], "real celebrities")
    for where, row in read_parquet(real_files, EVAL_COLUMNS, optional=("biography",)):
        entity = f"real-{_id(row, where)}"
        names[entity] = _name(row, where)
        image = store.add_hf_image(row["image"], src, f"{where} field 'image'")
        examples += _questions(row, where, entity, "real", lambda image=image: image, ids)

    train_files = _train_files(src, opt.train_path)
    if train_files:
        examples += _train_examples(train_files, src, store, ids)
    info = {
        "forget_ratios": ratios,
        "names": names,
        "train_data": [str(f) for f in train_files] if train_files else None,
        "test_images": "each image question of Test_Set is asked on the next held-out image in turn",
    }
    return examples, forget_sets, info


def _id(row: dict, where: str) -> str:
    value = row.get("ID")
    if value is None or str(value).strip() == "":
        raise DataError(f"{where} field 'ID': empty")
    return str(value).strip()


def _name(row: dict, where: str) -> str:
    bio = _json_field(row.get("biography"), where, "biography")
    return str(bio.get("Name", "")) if isinstance(bio, dict) else ""


def _json_field(value: Any, where: str, field: str) -> Any:
    """A nested field stored either as parquet structs or as a JSON string (both occur on the hub)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} field {field!r}: not valid JSON ({e.msg} at char {e.pos})") from e
    return value


def _shaped(value: Any, kind: type, where: str, field: str) -> Any:
    """``value`` if it is a ``kind`` (dict: a struct / JSON object, list: a list), else a DataError naming the field."""
    if not isinstance(value, kind):
        shape = "an object" if kind is dict else "a list"
        raise DataError(f"{where} field {field!r}: expected {shape}, got {type(value).__name__}")
    return value


def _cycle_images(row: dict, src: Path, store: ImageStore, where: str) -> Callable[[], str]:
    """Held-out images of a Test_Set row, handed out in turn so every image gets questions."""
    images = row.get("images") or []
    if not images:
        raise DataError(f"{where} field 'images': no held-out images")
    state = {"k": 0}

    def next_image() -> str:
        k = state["k"] % len(images)
        state["k"] += 1
        return store.add_hf_image(images[k], src, f"{where} field 'images[{k}]'")

    return next_image


def _questions(
    row: dict, where: str, entity: str, split: str, image_for: Callable[[], str], ids: Ids
) -> list[Example]:
    """All evaluation questions of one profile row: multiple choice, generation and cloze."""
    out: list[Example] = []

    def add(kind: str, task: str, prompt: Any, answer: Any, field: str, **kw: Any) -> None:
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise DataError(f"{where} field {field!r}: question and answer must be strings")
        image = image_for() if kind == "vqa" else None
        qtype = "image_textual" if kind == "vqa" else "pure_text"
        out.append(Example(id=ids(f"{entity}/{split}/{task}-{kind}"), entity=entity, kind=kind, task=task,
                           prompt=prompt, answer=answer, split=split, purpose="eval", image=image,
                           qtype=qtype, **kw))

    ct = _shaped(_json_field(row.get("Classification_Task"), where, "Classification_Task") or {}, dict, where,
                 "Classification_Task")
    for key, kind in MC_KEYS:
        for j, q in enumerate(_shaped(ct.get(key) or [], list, where, f"Classification_Task.{key}")):
            field = f"Classification_Task.{key}[{j}]"
            q = _shaped(q, dict, where, field)
            opts = _shaped(_json_field(q.get("Options"), where, f"{field}.Options") or {}, dict, where,
                           f"{field}.Options")
            letters = [k for k in sorted(opts) if opts[k] is not None]
            correct = str(q.get("Correct_Answer") or "").strip().upper()
            if correct not in letters:
                raise DataError(
                    f"{where} field {field + '.Correct_Answer'!r}: {q.get('Correct_Answer')!r} is not one of "
                    f"the options {letters}"
                )
            options = [str(opts[k]) for k in letters]
            add(kind, "mc", q.get("Question"), options[letters.index(correct)], field,
                options=options, answer_index=letters.index(correct))
    for column, task in (("Generation_Task", "gen"), ("Mask_Task", "cloze")):
        for j, q in enumerate(_shaped(_json_field(row.get(column), where, column) or [], list, where, column)):
            field = f"{column}[{j}]"
            q = _shaped(q, dict, where, field)
            kind = TYPE_KIND.get(q["Type"]) if isinstance(q.get("Type"), str) else None
            if kind is None:
                raise DataError(
                    f"{where} field {field + '.Type'!r}: {q.get('Type')!r}, expected one of {list(TYPE_KIND)}"
                )
            add(kind, task, q.get("Question"), q.get("Ground_Truth"), field)
    return out


def _train_files(src: Path, train_path: str | None) -> list[Path] | None:
    if train_path is None:
        return parquet_files(src, ["ft_Data"])
    p = Path(train_path).expanduser()
    if p.is_file():
        return [p]
    files = sorted(p.rglob("*.parquet")) if p.is_dir() else []
    if not files:
        raise DataError(f"{p}: training data not found (option 'train_path': a parquet file or a directory of them)")
    return files


def _train_examples(files: list[Path], src: Path, store: ImageStore, ids: Ids) -> list[Example]:
    """Fine-tuning pairs: ``metadata`` [{Question, Answer}] per person, or one ``question``/``answer`` per row."""
    out: list[Example] = []
    for where, row in read_parquet(files, ["ID"], optional=("image", "metadata", "question", "answer")):
        entity = _id(row, where)
        if "metadata" in row:
            pairs = _json_field(row["metadata"], where, "metadata") or []
            if not isinstance(pairs, list):
                raise DataError(f"{where} field 'metadata': expected a list of {{Question, Answer}}")
            qa = [(p.get("Question"), p.get("Answer"), f"metadata[{j}]") for j, p in enumerate(pairs)]
        elif "question" in row and "answer" in row:
            qa = [(row["question"], row["answer"], "question")]
        else:
            raise DataError(f"{where}: missing column 'metadata' (or 'question' and 'answer') for training pairs")
        cell = row.get("image")
        has_image = isinstance(cell, dict) and bool(cell.get("bytes") or cell.get("path"))
        image = store.add_hf_image(cell, src, f"{where} field 'image'") if has_image else None
        for question, answer, field in qa:
            if not question or not answer:
                continue  # the reference loader skips incomplete pairs too
            if not isinstance(question, str) or not isinstance(answer, str):
                raise DataError(f"{where} field {field!r}: Question and Answer must be strings")
            kind = "vqa" if image else "qa"
            out.append(Example(id=ids(f"{entity}/people/train-{kind}"), entity=entity, kind=kind, task="gen",
                               prompt=question, answer=answer, split="people", purpose="train", image=image,
                               qtype="profile"))
    return out
