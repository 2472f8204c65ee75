"""CLEAR (hub dataset ``therem/CLEAR``) read from the user's local copy.

Layout of the hub repository: one directory per config holding parquet shards (``forget05/train-*.parquet``;
the ``default`` config lives in ``data/``, ``real_world`` was uploaded as a ``test`` split). Columns:

- ``full``, ``forget01/05/10``, ``retain99/95/90``: ``image`` {bytes, path}, ``caption``, ``name``
  (3,768 images of 200 fictitious TOFU authors).
- ``forgetXX+tofu``, ``retainXX+tofu``, ``full+tofu``: ``image``, ``caption``, ``question``, ``answer``; image rows
  carry a caption, the TOFU rows carry a text question/answer and no image.
- ``forgetXX_perturbed``, ``retain_perturbed``: ``image``, ``caption``, ``name``, ``perturbed_captions``,
  ``paraphrased_caption``, ``perturbed_names`` (wrong names for the same person).
- ``real_faces``: ``image``, ``answer`` (the celebrity's name), ``options`` (wrong names).
- ``real_world``: ``question``, ``answer``, ``image``, ``prompt``, ``options`` (wrong answers).

Mapping (entity = the person's name as an id, see :func:`convert.slug`):
- training ("train"): every caption of ``full`` (VQA, prompt ``caption_prompt``) and every TOFU pair of
  ``full+tofu`` (text QA with its own answer);
- evaluation, split "people": for each image of ``forgetXX_perturbed`` and ``retain_perturbed``, caption
  generation and name multiple choice ("What is the name of the person in the image?", the true name among
  ``perturbed_names``); every TOFU pair of ``full+tofu`` as text QA generation;
- split "real": ``real_faces`` (name multiple choice) and ``real_world`` (its question, answer among
  ``options``);
- forget sets ``forget01/05/10``: the names in ``forget01/05/10``.
TOFU rows name no person; each is given the author whose full name occurs in its question (else answer),
or, when neither names anyone, the author of the nearest preceding row (TOFU lists 20 pairs per author).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
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
    slug,
)
from mmunlearn.data.schema import Example
from mmunlearn.errors import ConfigError, DataError

PUBLISHED_FORGET = (1, 5, 10)


@dataclass
class Options:
    """Options of ``convert("clear", ...)``.

    forget_ratios: which published forget sets (1, 5, 10) to convert; None = every one present locally.
    caption_prompt: the question asked with an image whose answer is its caption.
    name_prompt: the question of the name multiple choice (forget/retain images and real faces).
    seed: places the true answer among the wrong options (deterministic per example).
    """

    forget_ratios: Sequence[int | str] | None = None
    caption_prompt: str = "Describe the image in detail."
    name_prompt: str = "What is the name of the person in the image?"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.forget_ratios, (str, int)):
            self.forget_ratios = [self.forget_ratios]
        for field in ("caption_prompt", "name_prompt"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field).strip():
                raise ConfigError(f"option {field!r} must be a non-empty string")
        if not isinstance(self.seed, int):
            raise ConfigError(f"option 'seed' must be an integer, got {self.seed!r}")


class _People:
    """Names -> entity ids, kept unique even if two names slug alike."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.names: dict[str, str] = {}

    def add(self, name: str) -> str:
        if name not in self.ids:
            base = eid = slug(name)
            k = 2
            while eid in self.names:
                eid, k = f"{base}-{k}", k + 1
            self.ids[name], self.names[eid] = eid, name
        return self.ids[name]


def build(src: Path, store: ImageStore, opt: Options) -> tuple[list[Example], dict[str, list[str]], dict]:
    present = [r for r in PUBLISHED_FORGET if parquet_files(src, [f"forget{r:02d}"])]
    ratios = pick_ratios(opt.forget_ratios, PUBLISHED_FORGET, present, src)
    ids = Ids()
    people = _People()
    examples: list[Example] = []

    full = require_parquet(src, ["full", "data"], "all images with captions and names")
    for where, row in read_parquet(full, ["image", "caption", "name"]):
        entity = people.add(_text(row, "name", where))
        image = store.add_hf_image(row["image"], src, f"{where} field 'image'")
        examples.append(Example(id=ids(f"{entity}/people/train-caption"), entity=entity, kind="vqa", task="gen",
                                prompt=opt.caption_prompt, answer=_text(row, "caption", where), split="people",
                                purpose="train", image=image, qtype="caption"))
    known = dict(people.ids)

    def person(where: str, row: dict) -> str:
        name = _text(row, "name", where)
        if name not in known:
            raise DataError(f"{where} field 'name': {name!r} is not a person of {full[0].parent}")
        return known[name]

    forget_sets = read_forget_sets(src, ratios, lambda r: f"forget{r:02d}", "name", person)

    seen_images: set[str] = set()
    perturbed = [f"forget{r:02d}_perturbed" for r in ratios] + ["retain_perturbed"]
    for config in perturbed:
        files = require_parquet(src, [config], "evaluation images with wrong names and captions")
        cols = ["image", "caption", "name", "perturbed_names"]
        for where, row in read_parquet(files, cols, optional=("paraphrased_caption", "perturbed_captions")):
            entity = person(where, row)
            image = store.add_hf_image(row["image"], src, f"{where} field 'image'")
            if image in seen_images:  # forget01 is part of forget05, which is part of forget10
                continue
            seen_images.add(image)
            meta = {}
            if row.get("paraphrased_caption"):
                meta["paraphrased_caption"] = str(row["paraphrased_caption"])
            if row.get("perturbed_captions"):
                meta["perturbed_captions"] = json.dumps(list(row["perturbed_captions"]), ensure_ascii=False)
            examples.append(Example(id=ids(f"{entity}/people/caption"), entity=entity, kind="vqa", task="gen",
                                    prompt=opt.caption_prompt, answer=_text(row, "caption", where),
                                    split="people", purpose="eval", image=image, qtype="caption", meta=meta))
            eid = ids(f"{entity}/people/name")
            name = people.names[entity]
            options, idx = _mc(name, row.get("perturbed_names"), opt.seed, eid, f"{where} field 'perturbed_names'")
            examples.append(Example(id=eid, entity=entity, kind="vqa", task="mc", prompt=opt.name_prompt,
                                    answer=name, split="people", purpose="eval", image=image, options=options,
                                    answer_index=idx, qtype="name"))

    tofu = require_parquet(src, ["full+tofu"], "captions and TOFU question/answer pairs")
    pairs = [(where, _text(row, "question", where), _text(row, "answer", where))
             for where, row in read_parquet(tofu, ["image", "question", "answer"]) if _is_text_row(row)]
    for (_where, question, answer), entity in zip(pairs, _authors(pairs, known, tofu[0])):
        for purpose in ("train", "eval"):
            examples.append(Example(id=ids(f"{entity}/people/{purpose}-tofu"), entity=entity, kind="qa",
                                    task="gen", prompt=question, answer=answer, split="people", purpose=purpose,
                                    qtype="tofu"))

    names = dict(people.names)
    faces = require_parquet(src, ["real_faces"], "real celebrities")
    for where, row in read_parquet(faces, ["image", "answer", "options"]):
        answer = _text(row, "answer", where)
        entity = f"real-{slug(answer)}"
        names[entity] = answer
        eid = ids(f"{entity}/real/name")
        options, idx = _mc(answer, row.get("options"), opt.seed, eid, f"{where} field 'options'")
        examples.append(Example(id=eid, entity=entity, kind="vqa", task="mc", prompt=opt.name_prompt,
                                answer=answer, split="real", purpose="eval",
                                image=store.add_hf_image(row["image"], src, f"{where} field 'image'"),
                                options=options, answer_index=idx, qtype="real_face"))
    world = require_parquet(src, ["real_world"], "real-world visual questions")
    for where, row in read_parquet(world, ["question", "answer", "image", "options"], optional=("prompt",)):
        answer = _text(row, "answer", where)
        entity = f"real-{slug(answer)}"
        eid = ids(f"{entity}/real/world")
        options, idx = _mc(answer, row.get("options"), opt.seed, eid, f"{where} field 'options'")
        meta = {"prompt": str(row["prompt"])} if row.get("prompt") else {}
        examples.append(Example(id=eid, entity=entity, kind="vqa", task="mc", prompt=_text(row, "question", where),
                                answer=answer, split="real", purpose="eval",
                                image=store.add_hf_image(row["image"], src, f"{where} field 'image'"),
                                options=options, answer_index=idx, qtype="real_world", meta=meta))

    info = {
        "forget_ratios": ratios,
        "names": names,
        "tofu_author": "the author whose name the question (else answer) contains; else the previous row's",
    }
    return examples, forget_sets, info


def _text(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} field {field!r}: expected a non-empty string, got {value!r}")
    return value


def _is_text_row(row: dict) -> bool:
    cell = row.get("image")
    has_image = isinstance(cell, dict) and bool(cell.get("bytes") or cell.get("path"))
    return not has_image and bool(row.get("question"))


def _mc(answer: str, wrong: Any, seed: int, example_id: str, where: str) -> tuple[list[str], int]:
    """The true answer placed among the wrong ones at a position fixed by (seed, example id)."""
    if not isinstance(wrong, (list, tuple)) or not all(isinstance(w, str) for w in wrong):
        raise DataError(f"{where}: expected a list of strings, got {wrong!r}")
    options = [w for w in dict.fromkeys(wrong) if w != answer]
    if not options:
        raise DataError(f"{where}: no wrong options besides the answer {answer!r}")
    pos = random.Random(f"{seed}:{example_id}").randint(0, len(options))
    options.insert(pos, answer)
    return options, pos


def _authors(pairs: list[tuple[str, str, str]], known: dict[str, str], file: Path) -> list[str]:
    """The entity of each TOFU pair: the author named in the question or answer, else the previous one."""
    if not pairs:
        return []
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(known, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
    lower = {n.lower(): e for n, e in known.items()}
    found: list[str | None] = []
    for _, question, answer in pairs:
        m = pattern.search(question) or pattern.search(answer)
        found.append(lower[m.group(1).lower()] if m else None)
    first = next((e for e in found if e is not None), None)
    if first is None:
        raise DataError(f"{file}: no TOFU question or answer names a person of CLEAR; cannot assign authors")
    out, last = [], first
    for e in found:
        last = e or last
        out.append(last)
    return out
