"""Small copies of the published benchmark formats, written the way the hub stores them.

MLLMU-Bench and CLEAR are parquet files with the real column names and nesting (images as Hugging Face
``Image`` cells ``{bytes, path}`` holding PNG bytes); MMUBench is the released JSON files with substitute
images. Sizes are tiny so that conversion tests run in seconds.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SHARED_SIU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmubench-siu-release"

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
OPTIONS = pa.struct([(k, pa.string()) for k in "ABCD"])
MC = pa.list_(pa.struct([("Correct_Answer", pa.string()), ("Options", OPTIONS), ("Question", pa.string())]))
QA_TYPED = pa.list_(pa.struct([("Ground_Truth", pa.string()), ("Question", pa.string()), ("Type", pa.string())]))
CLASSIFICATION = pa.struct([("Image_Textual_Questions", MC), ("Pure_Text_Questions", MC)])


def png_bytes(seed: int, size: int = 8, fmt: str = "PNG") -> bytes:
    """A distinct tiny image per seed."""
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def image_cell(seed: int) -> dict:
    return {"bytes": png_bytes(seed), "path": f"{seed}.png"}


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# ----------------------------------------------------------------------------------------------------------
# MLLMU-Bench

MLLMU_PEOPLE = 20
MLLMU_FORGET = {5: [1], 10: [1, 2], 15: [1, 2, 3]}  # person numbers (of 20) in each forget set
MLLMU_REAL = 3
MLLMU_TEST_IMAGES = 2
MLLMU_TRAIN_QA = 3
# questions per person: MC 2 image + 1 text, generation 1 image + 1 text, cloze 1 image + 1 text
MLLMU_PER_PERSON = {"mc": 3, "gen": 2, "cloze": 2}
MLLMU_VQA_PER_PERSON = 4

EVAL_SCHEMA = pa.schema([
    ("image", IMAGE), ("ID", pa.string()), ("Directory", pa.string()), ("biography", pa.string()),
    ("question", pa.string()), ("answer", pa.string()), ("Classification_Task", CLASSIFICATION),
    ("Generation_Task", QA_TYPED), ("Mask_Task", QA_TYPED),
])
TEST_SCHEMA = EVAL_SCHEMA.append(pa.field("images", pa.list_(IMAGE)))
TRAIN_SCHEMA = pa.schema([("image", IMAGE), ("ID", pa.string()), ("metadata", pa.string())])


def _mc(question: str, right: str, letter: str) -> dict:
    wrong = iter(["Oslo", "Lima", "Kyiv", "Quito"])
    opts = {k: (right if k == letter else next(wrong)) for k in "ABCD"}
    return {"Question": question, "Options": opts, "Correct_Answer": letter}


def mllmu_person(pid: str, name: str, seed: int) -> dict:
    city = f"City{seed}"
    return {
        "image": image_cell(seed),
        "ID": pid,
        "Directory": f"data/{pid}",
        "biography": json.dumps({"Name": name, "Born": city, "Employment": "baker"}),
        "question": f"Who is {name}?",
        "answer": f"{name} is a baker.",
        "Classification_Task": {
            "Image_Textual_Questions": [
                _mc("Where was the person in the image born?", city, "ABCD"[seed % 4]),
                _mc("What does the person in the image do?", "baker", "B"),
            ],
            "Pure_Text_Questions": [_mc(f"Where was {name} born?", city, "C")],
        },
        "Generation_Task": [
            {"Question": "What is the job of the person in the image?", "Ground_Truth": "A baker.",
             "Type": "Image_Textual"},
            {"Question": f"Where was {name} born?", "Ground_Truth": f"In {city}.", "Type": "Pure_Text"},
        ],
        "Mask_Task": [
            {"Question": "The person in the image was born in __.", "Ground_Truth": city, "Type": "Image_Textual"},
            {"Question": f"{name} works as a __.", "Ground_Truth": "baker", "Type": "Pure_Text"},
        ],
    }


def write_mllmu(root: Path, *, train: bool = True) -> Path:
    """The hub layout: Full_Set, forget_X/retain_Y, Test_Set (two shards), Retain_Set, ft_Data."""
    people = [mllmu_person(str(i), f"Person {i}", i) for i in range(1, MLLMU_PEOPLE + 1)]
    write_parquet(root / "Full_Set" / "train-00000-of-00001.parquet", people, EVAL_SCHEMA)
    for ratio, members in MLLMU_FORGET.items():
        forget = [p for p in people if int(p["ID"]) in members]
        retain = [p for p in people if int(p["ID"]) not in members]
        write_parquet(root / f"forget_{ratio}" / "train-00000-of-00001.parquet", forget, EVAL_SCHEMA)
        write_parquet(root / f"retain_{100 - ratio}" / "train-00000-of-00001.parquet", retain, EVAL_SCHEMA)
    test = [{**p, "images": [image_cell(1000 + 10 * int(p["ID"]) + k) for k in range(MLLMU_TEST_IMAGES)]}
            for p in people]
    half = len(test) // 2
    write_parquet(root / "Test_Set" / "train-00000-of-00002.parquet", test[:half], TEST_SCHEMA)
    write_parquet(root / "Test_Set" / "train-00001-of-00002.parquet", test[half:], TEST_SCHEMA)
    real = [mllmu_person(str(i), f"Celebrity {i}", 500 + i) for i in range(1, MLLMU_REAL + 1)]
    write_parquet(root / "Retain_Set" / "train-00000-of-00001.parquet", real, EVAL_SCHEMA)
    if train:
        rows = [{"image": p["image"], "ID": p["ID"],
                 "metadata": json.dumps([{"Question": f"Q{k} about {p['ID']}?", "Answer": f"A{k}."}
                                         for k in range(MLLMU_TRAIN_QA)])} for p in people]
        write_parquet(root / "ft_Data" / "train-00000-of-00001.parquet", rows, TRAIN_SCHEMA)
    return root


# ----------------------------------------------------------------------------------------------------------
# CLEAR

CLEAR_PEOPLE = 10
CLEAR_IMAGES_PER_PERSON = 2
CLEAR_FORGET = {1: [0], 5: [0], 10: [0, 1]}  # person indices; forget01 is part of forget05 of forget10
CLEAR_RETAIN_PERTURBED = [8, 9]
CLEAR_TOFU_PER_PERSON = 3
CLEAR_REAL_FACES = 3
CLEAR_REAL_WORLD = 2

CAPTION_SCHEMA = pa.schema([("image", IMAGE), ("caption", pa.string()), ("name", pa.string())])
TOFU_SCHEMA = pa.schema([("image", IMAGE), ("caption", pa.string()), ("question", pa.string()),
                         ("answer", pa.string())])
PERTURBED_SCHEMA = pa.schema([
    ("image", IMAGE), ("caption", pa.string()), ("name", pa.string()),
    ("perturbed_captions", pa.list_(pa.string())), ("paraphrased_caption", pa.string()),
    ("perturbed_names", pa.list_(pa.string())),
])
FACES_SCHEMA = pa.schema([("image", IMAGE), ("answer", pa.string()), ("options", pa.list_(pa.string()))])
WORLD_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string()), ("image", IMAGE),
                          ("prompt", pa.string()), ("options", pa.list_(pa.string()))])


def clear_name(i: int) -> str:
    return f"Author{i} Surname{i}"


def write_clear(root: Path) -> Path:
    """The hub layout of therem/CLEAR (configs as directories of parquet shards)."""
    rows = [{"image": image_cell(10 * i + k), "caption": f"{clear_name(i)} at place {k}.", "name": clear_name(i)}
            for i in range(CLEAR_PEOPLE) for k in range(CLEAR_IMAGES_PER_PERSON)]
    write_parquet(root / "full" / "train-00000-of-00001.parquet", rows, CAPTION_SCHEMA)
    tofu = []
    for i in range(CLEAR_PEOPLE):
        tofu.append({"question": f"What is {clear_name(i)} known for?", "answer": f"Novels by author {i}."})
        tofu.append({"question": "Where was the author born?", "answer": f"The author was born in City{i}."})
        tofu.append({"question": "What genre do they write?", "answer": f"{clear_name(i)} writes poems."})
    mixed = [{"image": r["image"], "caption": r["caption"], "question": None, "answer": None} for r in rows]
    mixed += [{"image": None, "caption": None, **t} for t in tofu]
    write_parquet(root / "full+tofu" / "train-00000-of-00001.parquet", mixed, TOFU_SCHEMA)

    def perturbed(i: int, r: dict) -> dict:
        return {**r, "perturbed_captions": [f"Wrong caption {j}." for j in range(2)],
                "paraphrased_caption": f"Paraphrase of: {r['caption']}",
                "perturbed_names": [f"Fake{j} Name{i}" for j in range(3)]}

    for ratio, members in CLEAR_FORGET.items():
        sel = [r for r in rows if int(r["name"].split()[0][6:]) in members]
        write_parquet(root / f"forget{ratio:02d}" / "train-00000-of-00001.parquet", sel, CAPTION_SCHEMA)
        pert = [perturbed(int(r["name"].split()[0][6:]), r) for r in sel]
        write_parquet(root / f"forget{ratio:02d}_perturbed" / "train-00000-of-00001.parquet", pert,
                      PERTURBED_SCHEMA)
    ret = [perturbed(i, r) for r in rows for i in CLEAR_RETAIN_PERTURBED if r["name"] == clear_name(i)]
    write_parquet(root / "retain_perturbed" / "train-00000-of-00001.parquet", ret, PERTURBED_SCHEMA)
    faces = [{"image": image_cell(700 + i), "answer": f"Celebrity {i}", "options": [f"Other {i}a", f"Other {i}b"]}
             for i in range(CLEAR_REAL_FACES)]
    write_parquet(root / "real_faces" / "train-00000-of-00001.parquet", faces, FACES_SCHEMA)
    world = [{"question": f"What landmark is this ({i})?", "answer": f"Tower {i}", "image": image_cell(800 + i),
              "prompt": f"What landmark is this ({i})? Answer briefly.", "options": ["Bridge", "Castle", "Dam"]}
             for i in range(CLEAR_REAL_WORLD)]
    write_parquet(root / "real_world" / "test-00000-of-00001.parquet", world, WORLD_SCHEMA)
    return root


# ----------------------------------------------------------------------------------------------------------
# MMUBench (SIU release)

MMUBENCH_EXTRA_TEST_IMAGES = 3


def write_mmubench(root: Path) -> tuple[Path, Path]:
    """The released JSON files (copied unchanged) plus substitute images named as the release names them.

    Returns (data directory, image directory).
    """
    data = root / "release"
    data.mkdir(parents=True)
    for f in sorted(SHARED_SIU.glob("*.json")):
        shutil.copy(f, data / f.name)
    images = data / "images"
    images.mkdir()
    names = {Path(i["image"]).name for f in ("SIU.json", "GA.json", "PO.json")
             for i in json.loads((data / f).read_text()) if "image" in i}
    names |= {Path(i["imgid"]).name for i in json.loads((data / "Multi-hop.json").read_text())}
    names |= {f"extra_{k}.jpg" for k in range(MMUBENCH_EXTRA_TEST_IMAGES)}
    for k, name in enumerate(sorted(names)):
        (images / name).write_bytes(png_bytes(3000 + k, fmt="JPEG"))
    return data, images


def rewrite_parquet(path: Path, mutate: Callable[[dict], None] | None = None, drop: str | None = None) -> None:
    """Rewrite one parquet file with its first row changed by ``mutate`` and/or column ``drop`` removed."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    if mutate is not None:
        mutate(rows[0])
    schema = table.schema
    if drop is not None:
        schema = schema.remove(schema.get_field_index(drop))
        rows = [{k: v for k, v in r.items() if k != drop} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
