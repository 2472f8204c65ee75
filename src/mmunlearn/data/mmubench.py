"""MMUBench (SIU paper) files and the LLaVA conversation format that SIU's fine-tuning data uses.

Released files (concept: Donald Trump; only the JSON files were published, not the images):

- ``SIU.json``, ``GA.json``, ``PO.json``: LLaVA conversation items ``{"id", "image", "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}], "target_phrase"}``; text-only
  items have no ``image``; ``target_phrase`` is the unseen name, the whole new description, or ``"none"``.
  GA/PO items have no ``target_phrase``. Ids repeat within a file.
- ``execcuatedata.json`` ``[{"prompt", "target"}]``: generality prompts; a response forgets when the target
  ("trump" / "yes") is absent. ``multilanguage.json`` ``[{"prompt"}]``: those prompts translated (jailbreak).
  ``Multi-hop.json`` ``[{"imgid", "prompt"}]``: questions that need the hidden identity. ``miadata.json``
  ``[{"prompt"}]``: membership-inference prompts.

Image paths in the release are absolute paths on the authors' machine. They are mapped by file name into the
user's image directory (a relative path must stay inside it); with ``assign_images`` the user's own images
stand in for the ones they do not have. Prompts that come without an image are asked on the user's held-out
images of the concept (every image but the unlearning one), in turn.

Mapping: SIU/GA/PO items -> purpose "train", split "people" (``meta["set"]`` = "siu" / "ga" / "po"); the other
files -> purpose "eval", split "test" (``meta["set"]`` = "em" / "multilanguage" / "multihop" / "mia"). The
concept is one entity and forget set "concept" = [it].
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmunlearn.data.convert import IMAGE_SUFFIXES, ImageStore, slug
from mmunlearn.data.schema import Example
from mmunlearn.errors import ConfigError, DataError

SIU_FILES = {"SIU.json": "siu", "GA.json": "ga", "PO.json": "po"}
PROMPT_FILES = {  # file -> (set name, required fields)
    "execcuatedata.json": ("em", ("prompt", "target")),
    "multilanguage.json": ("multilanguage", ("prompt",)),
    "Multi-hop.json": ("multihop", ("imgid", "prompt")),
    "miadata.json": ("mia", ("prompt",)),
}
RELEASE_FILES = (*SIU_FILES, *PROMPT_FILES)
SUBDIRS = ("", "finetunedata", "evaldata")  # the release mirror keeps the two groups in these folders
IMAGE_TOKEN = "<image>"


@dataclass
class Options:
    """Options of ``convert("mmubench", ...)``.

    image_dir: the user's images of the concept (default ``<src>/images``): the unlearning image plus, unless
        ``test_image_dir`` is given, the held-out ones asked about by every evaluation prompt.
    test_image_dir: a separate directory of held-out images (the release mirror's ``testdon/``, with
        ``image_dir`` its ``traindon/``); Multi-hop images are looked up there first.
    concept: the concept's name (the release is about Donald Trump); its id is the forget set "concept".
    forget_image: file name (in image_dir) of the unlearning image; default: the image the SIU/GA/PO items
        name, when present in image_dir (with ``assign_images``: else the first image).
    assign_images: use the user's images for items whose named image is not in image_dir (the unlearning
        image for SIU/GA/PO, held-out images in turn for Multi-hop) instead of failing.
    """

    image_dir: str | None = None
    test_image_dir: str | None = None
    concept: str = "Donald Trump"
    forget_image: str | None = None
    assign_images: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ConfigError("option 'concept' must be the concept's name, e.g. 'Donald Trump'")
        if not isinstance(self.assign_images, bool):
            raise ConfigError(f"option 'assign_images' must be true or false, got {self.assign_images!r}")


# ---------------------------------------------------------------------------------------------------------
# LLaVA conversation JSON (SIU.json and the data SIU construction writes)


def read_siu_json(
    path: str | os.PathLike, image_dir: str | os.PathLike, entity: str = "concept", *,
    missing_image: str | os.PathLike | None = None,
) -> list[Example]:
    """Read a LLaVA conversation file (SIU.json, GA.json, PO.json) into training examples of ``entity``.

    Each item has one human and one gpt turn. ``image`` is resolved in ``image_dir`` (an absolute path by its
    file name; a relative one must stay inside the directory) and returned as an absolute path; a missing
    image is an error unless ``missing_image`` names a stand-in. A repeated id gets a ``~2``, ``~3`` suffix.
    ``target_phrase`` "none" (or absent) becomes None. ``qtype`` is read when present (our own files), else "".
    """
    path = Path(path)
    image_dir = Path(image_dir)
    items = _load_list(path)
    used: set[str] = set()
    out = []
    for i, item in enumerate(items):
        where = f"{path} item {i}"
        raw_id = _field(item, "id", where)
        eid, k = raw_id, 2
        while eid in used:
            eid, k = f"{raw_id}~{k}", k + 1
        used.add(eid)
        if "conversations" not in item:
            raise DataError(f"{where}: missing field 'conversations'")
        conv = item["conversations"]
        if (not isinstance(conv, list) or len(conv) != 2 or not all(isinstance(t, dict) for t in conv)
                or [t.get("from") for t in conv] != ["human", "gpt"]
                or not all(isinstance(t.get("value"), str) for t in conv)):
            raise DataError(f"{where} field 'conversations': expected [{{from: human, value}}, {{from: gpt, value}}]")
        image = None
        if "image" in item:
            raw = _field(item, "image", where)
            found = locate_image(raw, image_dir, f"{where} field 'image'")
            if found is None and missing_image is None:
                raise _no_image(raw, image_dir, f"{where} field 'image'")
            image = str(found or Path(missing_image).resolve())
        target = item.get("target_phrase")
        if target is not None and not isinstance(target, str):
            raise DataError(f"{where} field 'target_phrase': expected a string, got {target!r}")
        if target is not None and target.strip().lower() == "none":
            target = None
        qtype = item.get("qtype", "")
        if not isinstance(qtype, str):
            raise DataError(f"{where} field 'qtype': expected a string, got {qtype!r}")
        out.append(Example(id=eid, entity=entity, kind="vqa" if image else "qa", task="gen",
                           prompt=_strip_image_token(conv[0]["value"]), answer=conv[1]["value"], split="people",
                           purpose="train", image=image, qtype=qtype, target_phrase=target))
    return out


def write_siu_json(examples: Iterable[Example], path: str | os.PathLike) -> None:
    """Write examples in the LLaVA conversation format of SIU.json (atomically).

    ``image`` is written as the example holds it (use absolute paths, or paths relative to the image directory
    the file will be read with); ``target_phrase`` None is written "none"; a non-empty ``qtype`` is kept as an
    extra key, which LLaVA-style loaders ignore. ``read_siu_json`` reads the file back into equal examples.
    """
    items = []
    for e in examples:
        if e.task != "gen":
            raise DataError(f"example {e.id!r}: only generation examples fit a conversation file (task {e.task!r})")
        item: dict[str, Any] = {"id": e.id}
        if e.image is not None:
            item["image"] = e.image
        human = f"{IMAGE_TOKEN}\n{e.prompt}" if e.image is not None else e.prompt
        item["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": e.answer}]
        item["target_phrase"] = e.target_phrase if e.target_phrase is not None else "none"
        if e.qtype:
            item["qtype"] = e.qtype
        items.append(item)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(items, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def question_type(prompt: str, has_image: bool, concept: str) -> str:
    """SIU's four targets, told apart by the question: "identity" (image, no name asked about: target 1),
    "recognition" (image, asks about the concept by name: target 2), "fact" (text about the concept: target 3),
    "other" (text about anyone else: target 4). The concept matches by full name or surname, on word boundaries.
    """
    parts = concept.split()
    aliases = {concept, parts[-1]} if parts else {concept}
    named = any(re.search(rf"\b{re.escape(a)}\b", prompt, re.IGNORECASE) for a in aliases)
    if has_image:
        return "recognition" if named else "identity"
    return "fact" if named else "other"


def locate_image(raw: str, image_dir: Path, where: str) -> Path | None:
    """Where a released image path lives in the user's ``image_dir`` (see the module docstring); None when
    the file is not there. A path that leads out of the directory is an error."""
    base = image_dir.resolve()
    p = (base / _name_in_dir(raw)).resolve()
    if not p.is_relative_to(base):
        raise DataError(f"{where}: image path {raw!r} escapes the image directory {image_dir}")
    return p if p.is_file() else None


def _name_in_dir(raw: str) -> str:
    """An absolute path (POSIX or Windows) stands for its file name; a relative one is kept."""
    if os.path.isabs(raw) or re.match(r"[A-Za-z]:[\\/]", raw):
        return re.split(r"[\\/]", raw)[-1]
    return raw


def _no_image(raw: str, image_dir: Path, where: str) -> DataError:
    return DataError(
        f"{where}: image {raw!r} does not exist as {image_dir / _name_in_dir(raw)} (put it there, or convert with "
        f"assign_images=True to use your own images)"
    )


def read_prompts(path: str | os.PathLike, required: Sequence[str] = ("prompt",)) -> list[dict[str, str]]:
    """Read a prompt file (execcuatedata.json, multilanguage.json, Multi-hop.json, miadata.json)."""
    path = Path(path)
    out = []
    for i, item in enumerate(_load_list(path)):
        where = f"{path} item {i}"
        out.append({k: _field(item, k, where) for k in required})
    return out


def _load_list(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{path}: file does not exist") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(item).__name__}")
    return data


def _field(item: dict, key: str, where: str) -> str:
    if key not in item:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(item[key], str):
        raise DataError(f"{where} field {key!r}: expected a string, got {item[key]!r}")
    return item[key]


def _strip_image_token(text: str) -> str:
    if text.startswith(IMAGE_TOKEN):
        return text[len(IMAGE_TOKEN):].lstrip("\n")
    if text.endswith(IMAGE_TOKEN):
        return text[: -len(IMAGE_TOKEN)].rstrip("\n")
    return text


# ---------------------------------------------------------------------------------------------------------
# Conversion of the release


def find_release_file(src: Path, name: str) -> Path:
    for sub in SUBDIRS:
        p = src / sub / name
        if p.is_file():
            return p
    raise DataError(f"{src}: missing file {name!r} of the MMUBench release (looked in {', '.join(SUBDIRS[1:])} too)")


def build(src: Path, store: ImageStore, opt: Options) -> tuple[list[Example], dict[str, list[str]], dict]:
    concept = opt.concept.strip()
    cid = slug(concept)
    image_dir = Path(opt.image_dir).expanduser() if opt.image_dir else src / "images"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image directory of the concept does not exist (option 'image_dir')")
    files = {name: find_release_file(src, name) for name in RELEASE_FILES}
    user_images = _images_in(image_dir, concept)
    forget = _forget_image(opt, files, image_dir, user_images)
    if opt.test_image_dir:
        test_dir = Path(opt.test_image_dir).expanduser()
        if not test_dir.is_dir():
            raise DataError(f"{test_dir}: held-out image directory does not exist (option 'test_image_dir')")
        held_out = [p.resolve() for p in _images_in(test_dir, concept)]
        lookup = [test_dir, image_dir]
    else:
        held_out = [p.resolve() for p in user_images if forget is None or p.resolve() != forget]
        lookup = [image_dir]

    examples: list[Example] = []
    for name, tag in SIU_FILES.items():
        stand_in = forget if opt.assign_images else None
        for i, e in enumerate(read_siu_json(files[name], image_dir, cid, missing_image=stand_in)):
            e.id = f"{tag}/{e.id}"
            e.qtype = e.qtype or question_type(e.prompt, e.image is not None, concept)
            e.meta = {**e.meta, "set": tag}
            if e.image is not None:
                e.image = store.add_file(Path(e.image), f"{files[name]} item {i} field 'image'")
            examples.append(e)

    def held_out_image(k: int, where: str) -> str:
        if not held_out:
            raise DataError(
                f"{where}: needs held-out images of {concept} in {image_dir}, which holds none besides the "
                f"unlearning image"
            )
        return store.add_file(held_out[k % len(held_out)], where)

    for name, (tag, required) in PROMPT_FILES.items():
        for k, item in enumerate(read_prompts(files[name], required)):
            where = f"{files[name]} item {k}"
            if tag == "multihop":
                found = (locate_image(item["imgid"], d, f"{where} field 'imgid'") for d in lookup)
                p = next((f for f in found if f is not None), None)
                if p is None and not opt.assign_images:
                    raise _no_image(item["imgid"], lookup[0], f"{where} field 'imgid'")
                image = (store.add_file(p, f"{where} field 'imgid'") if p else
                         held_out_image(k, f"{where} field 'imgid'"))
            else:
                image = held_out_image(k, f"{files[name]} (prompts without an image)")
            # The answer a model that still knows the concept gives: the EM target, or (translated identity
            # prompts) the name. Multi-hop and MIA prompts have no reference answer; they are judged or scored.
            meta = {"set": tag}
            if tag == "em":
                answer, meta["target"] = item["target"].strip(), item["target"]
            elif tag == "multilanguage":
                answer = concept
            else:
                answer = ""
            examples.append(Example(id=f"{tag}/{k}", entity=cid, kind="vqa", task="gen", prompt=item["prompt"],
                                    answer=answer, split="test", purpose="eval", image=image, qtype=tag,
                                    meta=meta))
    info = {
        "names": {cid: concept},
        "concept": {"id": cid, "name": concept},
        "forget_image": store.add_file(forget, "forget image") if forget else None,
        "image_dir": str(image_dir.resolve()),
        "held_out_images": len(held_out),
        "sets": dict(Counter(e.meta["set"] for e in examples)),
    }
    return examples, {"concept": [cid]}, info


def _images_in(directory: Path, concept: str) -> list[Path]:
    images = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{directory}: no images of {concept} ({', '.join(IMAGE_SUFFIXES)}) in the directory")
    return images


def _forget_image(opt: Options, files: dict[str, Path], image_dir: Path, user_images: list[Path]) -> Path | None:
    """The unlearning image in the user's directory (None: not there, and not to be assigned)."""
    if opt.forget_image:
        p = locate_image(opt.forget_image, image_dir, "option 'forget_image'")
        if p is None:
            raise DataError(f"option 'forget_image': {opt.forget_image!r} is not a file in {image_dir}")
        return p
    named: Counter[str] = Counter()
    for name in SIU_FILES:
        for item in _load_list(files[name]):
            if isinstance(item.get("image"), str):
                named[Path(item["image"]).name] += 1
    for basename, _ in named.most_common():
        p = image_dir / basename
        if p.is_file():
            return p.resolve()
    if opt.assign_images and user_images:
        return user_images[0].resolve()
    return None
