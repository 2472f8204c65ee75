"""Conversion of the published benchmarks (MLLMU-Bench, CLEAR, MMUBench) into benchmark directories.

Fixtures are written in the published formats (tests/fixtures_formats.py); the MMUBench tests read the real
released JSON files from the shared data directory.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from fixtures_formats import (
    CLEAR_FORGET,
    CLEAR_IMAGES_PER_PERSON,
    CLEAR_PEOPLE,
    CLEAR_REAL_FACES,
    CLEAR_REAL_WORLD,
    CLEAR_RETAIN_PERTURBED,
    CLEAR_TOFU_PER_PERSON,
    MLLMU_FORGET,
    MLLMU_PEOPLE,
    MLLMU_PER_PERSON,
    MLLMU_REAL,
    MLLMU_TEST_IMAGES,
    MLLMU_TRAIN_QA,
    MLLMU_VQA_PER_PERSON,
    MMUBENCH_EXTRA_TEST_IMAGES,
    SHARED_SIU,
    clear_name,
    png_bytes,
    rewrite_parquet,
    write_clear,
    write_mllmu,
    write_mmubench,
)
from mmunlearn.data.convert import ImageStore, convert
from mmunlearn.data.mmubench import (
    PROMPT_FILES,
    RELEASE_FILES,
    SIU_FILES,
    question_type,
    read_prompts,
    read_siu_json,
    write_siu_json,
)
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError, DataError

Mutator = Callable[[dict], None]
needs_release = pytest.mark.skipif(
    not SHARED_SIU.is_dir(), reason=f"MMUBench release files not found at {SHARED_SIU} (shared data directory)"
)
RELEASE_COUNTS = {"SIU.json": 25, "GA.json": 25, "PO.json": 20, "execcuatedata.json": 100,
                  "multilanguage.json": 305, "Multi-hop.json": 70, "miadata.json": 800}


def split_counts(b: Benchmark) -> Counter:
    return Counter((e.split, e.purpose) for e in b.examples)


def assert_images_open(b: Benchmark) -> None:
    for e in b.examples:
        if e.image is not None:
            with Image.open(b.image_path(e)) as im:
                im.load()
            assert Path(e.image).suffix in (".png", ".jpg")


# ----------------------------------------------------------------------------------------------------------
# MLLMU-Bench


@pytest.fixture(scope="module")
def mllmu_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mllmu(tmp_path_factory.mktemp("mllmu") / "MLLMU-Bench")


@pytest.fixture(scope="module")
def mllmu_bench(mllmu_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Benchmark:
    return convert("mllmu-bench", mllmu_src, tmp_path_factory.mktemp("out") / "bench")


def test_mllmu_converts_and_loads(mllmu_bench: Benchmark) -> None:
    b = Benchmark.load(mllmu_bench.root)
    per = sum(MLLMU_PER_PERSON.values())
    assert split_counts(b) == {
        ("people", "eval"): MLLMU_PEOPLE * per,
        ("test", "eval"): MLLMU_PEOPLE * per,
        ("real", "eval"): MLLMU_REAL * per,
        ("people", "train"): MLLMU_PEOPLE * MLLMU_TRAIN_QA,
    }
    assert b.forget_sets == {f"forget{r:02d}": [str(i) for i in m] for r, m in MLLMU_FORGET.items()}
    assert len(b.select("forget", "forget10", purpose="eval")) == 2 * per
    assert len(b.select("retain", "forget10", purpose="eval")) == (MLLMU_PEOPLE - 2) * per
    assert len(b.select("test", "forget15")) == 3 * per
    assert b.info["names"]["3"] == "Person 3" and b.info["names"]["real-1"] == "Celebrity 1"
    assert_images_open(b)


def test_mllmu_question_mapping(mllmu_bench: Benchmark) -> None:
    people = [e for e in mllmu_bench.examples if e.entity == "4" and e.split == "people" and e.purpose == "eval"]
    assert Counter(e.task for e in people) == MLLMU_PER_PERSON
    assert sum(e.kind == "vqa" for e in people) == MLLMU_VQA_PER_PERSON
    mc = [e for e in people if e.task == "mc"]
    assert mc[0].options == ["City4", "Oslo", "Lima", "Kyiv"]
    assert mc[0].answer_index == 0 and mc[0].answer == "City4"  # Correct_Answer "A"
    assert mc[2].kind == "qa" and mc[2].image is None and mc[2].answer_index == 2 and mc[2].answer == "City4"
    cloze = [e for e in people if e.task == "cloze"]
    assert "__" in cloze[0].prompt and cloze[0].answer == "City4" and cloze[0].kind == "vqa"
    assert {e.qtype for e in people} == {"image_textual", "pure_text"}
    assert len({e.image for e in people if e.image}) == 1  # the profile image


def test_mllmu_test_split_uses_held_out_images(mllmu_bench: Benchmark) -> None:
    test = [e for e in mllmu_bench.examples if e.entity == "4" and e.split == "test"]
    people_image = next(e.image for e in mllmu_bench.examples if e.entity == "4" and e.split == "people" and e.image)
    images = Counter(e.image for e in test if e.kind == "vqa")
    assert len(images) == MLLMU_TEST_IMAGES and people_image not in images
    assert sorted(images.values()) == [MLLMU_VQA_PER_PERSON // 2] * 2  # handed out in turn


def test_mllmu_training_pairs(mllmu_bench: Benchmark, mllmu_src: Path, tmp_path: Path) -> None:
    train = [e for e in mllmu_bench.examples if e.purpose == "train"]
    assert all(e.kind == "vqa" and e.task == "gen" and e.image for e in train)
    assert train[0].prompt == "Q0 about 1?" and train[0].answer == "A0."
    # training data outside the benchmark copy, pointed at explicitly
    src = tmp_path / "copy"
    shutil.copytree(mllmu_src, src)
    shutil.move(src / "ft_Data", tmp_path / "baseline_train")
    b = convert("mllmu-bench", src, tmp_path / "a")
    assert not [e for e in b.examples if e.purpose == "train"]
    b = convert("mllmu-bench", src, tmp_path / "b", train_path=str(tmp_path / "baseline_train"))
    assert len([e for e in b.examples if e.purpose == "train"]) == MLLMU_PEOPLE * MLLMU_TRAIN_QA
    with pytest.raises(DataError, match="train_path"):
        convert("mllmu-bench", src, tmp_path / "c", train_path=str(tmp_path / "nowhere"))


def test_mllmu_forget_ratios(mllmu_src: Path, tmp_path: Path) -> None:
    b = convert("mllmu-bench", mllmu_src, tmp_path / "a", forget_ratios=["05", 15])
    assert sorted(b.forget_sets) == ["forget05", "forget15"]
    with pytest.raises(DataError, match=r"forget ratio 20 does not exist; available: 5, 10, 15"):
        convert("mllmu-bench", mllmu_src, tmp_path / "b", forget_ratios=[20])
    assert not (tmp_path / "b").exists()


def _broken_mllmu(tmp_path: Path, subset: str, mutate: Mutator | None, drop: str | None) -> Path:
    src = write_mllmu(tmp_path / "src", train=False)
    rewrite_parquet(min((src / subset).glob("*.parquet")), mutate, drop)
    return src


def _set(path: str, value: object) -> Mutator:
    """Set a nested field of the first row (path like "Mask_Task.0.Type")."""

    def mutate(row: dict) -> None:
        *parents, last = path.split(".")
        target = row
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        target[int(last) if last.isdigit() else last] = value

    return mutate


@pytest.mark.parametrize(
    ("subset", "mutate", "drop", "message"),
    [
        ("Full_Set", None, "Classification_Task",
         r"Full_Set/train-00000-of-00001.parquet: missing column 'Classification_Task'"),
        ("Full_Set", _set("image", {"bytes": b"not an image", "path": "x.png"}), None,
         r"Full_Set/train-00000-of-00001.parquet row 0 field 'image': image bytes do not decode"),
        ("Full_Set", _set("biography", "{'Name': oops"), None, r"row 0 field 'biography': not valid JSON"),
        ("Full_Set", _set("Classification_Task.Pure_Text_Questions.0.Correct_Answer", "E"), None,
         r"field 'Classification_Task.Pure_Text_Questions\[0\].Correct_Answer': 'E' is not one of the options"),
        ("Retain_Set", _set("Mask_Task.0.Type", "Image"), None, r"Retain_Set/.*field 'Mask_Task\[0\].Type'"),
        ("Test_Set", _set("images", []), None, r"Test_Set/train-00000-of-00002.parquet row 0 field 'images'"),
        ("forget_5", _set("ID", "999"), None, r"forget_5/.*field 'ID': '999' is not one of the profiles"),
    ],
)
def test_mllmu_malformed(
    tmp_path: Path, subset: str, mutate: Mutator | None, drop: str | None, message: str
) -> None:
    src = _broken_mllmu(tmp_path, subset, mutate, drop)
    with pytest.raises(DataError, match=message) as err:
        convert("mllmu-bench", src, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_mllmu_missing_subset(tmp_path: Path) -> None:
    src = write_mllmu(tmp_path / "src", train=False)
    shutil.rmtree(src / "Test_Set")
    with pytest.raises(DataError, match=r"missing subset 'Test_Set'.*expected parquet files under"):
        convert("mllmu-bench", src, tmp_path / "out")
    for d in src.glob("forget_*"):
        shutil.rmtree(d)
    with pytest.raises(DataError, match=r"no forget subset found; published forget ratios: 5, 10, 15"):
        convert("mllmu-bench", src, tmp_path / "out")


def test_unreadable_parquet_and_image_formats(tmp_path: Path) -> None:
    src = write_mllmu(tmp_path / "src", train=False)
    (src / "Retain_Set" / "train-00000-of-00001.parquet").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(DataError, match=r"Retain_Set/train-00000-of-00001.parquet: not a readable parquet file "
                                        r"\(a Git LFS pointer: fetch the file with 'git lfs pull'\)"):
        convert("mllmu-bench", src, tmp_path / "out")
    store = ImageStore(tmp_path / "store")
    assert store.add_bytes(png_bytes(1, fmt="GIF"), "gif").endswith(".png")  # re-encoded
    assert store.add_bytes(png_bytes(1, fmt="JPEG"), "jpeg").endswith(".jpg")  # kept as it is
    assert store.add_bytes(png_bytes(1), "png") == store.add_bytes(png_bytes(1), "again")  # stored once
    with Image.open(tmp_path / "store" / store.add_bytes(png_bytes(1, fmt="GIF"), "gif")) as im:
        assert im.format == "PNG"


def test_mllmu_without_full_set(tmp_path: Path) -> None:
    """Early uploads had only forget_X/retain_Y: a pair covers all profiles."""
    src = write_mllmu(tmp_path / "src", train=False)
    shutil.rmtree(src / "Full_Set")
    b = convert("mllmu-bench", src, tmp_path / "out")
    assert len({e.entity for e in b.examples if e.split == "people"}) == MLLMU_PEOPLE


# ----------------------------------------------------------------------------------------------------------
# CLEAR


@pytest.fixture(scope="module")
def clear_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clear(tmp_path_factory.mktemp("clear") / "CLEAR")


@pytest.fixture(scope="module")
def clear_bench(clear_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Benchmark:
    return convert("clear", clear_src, tmp_path_factory.mktemp("out") / "bench")


def test_clear_converts_and_loads(clear_bench: Benchmark) -> None:
    b = Benchmark.load(clear_bench.root)
    eval_people = len(CLEAR_FORGET[10]) + len(CLEAR_RETAIN_PERTURBED)  # forget01 and 05 are inside forget10
    tofu = CLEAR_PEOPLE * CLEAR_TOFU_PER_PERSON
    assert split_counts(b) == {
        ("people", "train"): CLEAR_PEOPLE * CLEAR_IMAGES_PER_PERSON + tofu,
        ("people", "eval"): eval_people * CLEAR_IMAGES_PER_PERSON * 2 + tofu,
        ("real", "eval"): CLEAR_REAL_FACES + CLEAR_REAL_WORLD,
    }
    slug = {i: clear_name(i).lower().replace(" ", "-") for i in range(CLEAR_PEOPLE)}
    assert b.forget_sets == {f"forget{r:02d}": [slug[i] for i in m] for r, m in CLEAR_FORGET.items()}
    forget = b.select("forget", "forget10", purpose="eval", kind="vqa")
    assert Counter(e.task for e in forget) == {"gen": 4, "mc": 4}
    assert len(b.select("retain", "forget10", purpose="eval", kind="vqa")) == 2 * 2 * len(CLEAR_RETAIN_PERTURBED)
    assert b.info["names"][slug[3]] == clear_name(3)
    assert_images_open(b)
    # each image is stored once although it appears in full, forget01/05/10 and their perturbed copies
    assert len(list((b.root / "images").iterdir())) == CLEAR_PEOPLE * CLEAR_IMAGES_PER_PERSON + 5


def test_clear_mapping(clear_bench: Benchmark) -> None:
    ex = clear_bench.examples
    name_mc = next(e for e in ex if e.qtype == "name" and e.entity == "author1-surname1")
    assert name_mc.prompt == "What is the name of the person in the image?"
    assert sorted(name_mc.options) == sorted(["Fake0 Name1", "Fake1 Name1", "Fake2 Name1", clear_name(1)])
    assert name_mc.options[name_mc.answer_index] == clear_name(1) == name_mc.answer
    caption = next(e for e in ex if e.qtype == "caption" and e.purpose == "eval")
    assert caption.task == "gen" and caption.answer.endswith(".") and "paraphrased_caption" in caption.meta
    assert json.loads(caption.meta["perturbed_captions"]) == ["Wrong caption 0.", "Wrong caption 1."]
    # TOFU pairs keep their own answers; a pair naming nobody belongs to the author of the pair before it
    tofu = [e for e in ex if e.qtype == "tofu" and e.purpose == "eval"]
    assert all(e.kind == "qa" and e.image is None for e in tofu)
    born = [e for e in tofu if e.prompt == "Where was the author born?"]
    assert [e.entity for e in born] == [f"author{i}-surname{i}" for i in range(CLEAR_PEOPLE)]
    assert all(e.answer == f"The author was born in City{i}." for i, e in enumerate(born))
    world = next(e for e in ex if e.qtype == "real_world")
    assert world.options[world.answer_index] == world.answer == "Tower 0" and len(world.options) == 4
    assert world.meta["prompt"].endswith("Answer briefly.")
    face = next(e for e in ex if e.qtype == "real_face")
    assert face.split == "real" and face.options[face.answer_index] == "Celebrity 0"


def test_clear_options_deterministic(clear_src: Path, clear_bench: Benchmark, tmp_path: Path) -> None:
    again = convert("clear", clear_src, tmp_path / "again")
    assert [e.options for e in again.examples] == [e.options for e in clear_bench.examples]


@pytest.mark.parametrize(
    ("config", "mutate", "drop", "message"),
    [
        ("full", None, "name", r"full/train-00000-of-00001.parquet: missing column 'name'"),
        ("real_faces", _set("image", {"bytes": b"\x89PNG broken", "path": None}), None,
         r"real_faces/train-00000-of-00001.parquet row 0 field 'image': image bytes do not decode"),
        ("forget05", _set("name", "Nobody Known"), None, r"forget05/.* field 'name': 'Nobody Known' is not a person"),
        ("retain_perturbed", _set("perturbed_names", []), None, r"retain_perturbed/.*field 'perturbed_names'"),
        ("full+tofu", None, "question", r"full\+tofu/train-00000-of-00001.parquet: missing column 'question'"),
        ("real_world", _set("image", {"bytes": None, "path": "../../../etc/passwd"}), None,
         r"real_world/.*field 'image': image path '../../../etc/passwd' escapes the data directory"),
    ],
)
def test_clear_malformed(
    tmp_path: Path, config: str, mutate: Mutator | None, drop: str | None, message: str
) -> None:
    src = write_clear(tmp_path / "src")
    rewrite_parquet(min((src / config).glob("*.parquet")), mutate, drop)
    with pytest.raises(DataError, match=message):
        convert("clear", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_clear_ratios_and_missing_config(tmp_path: Path) -> None:
    src = write_clear(tmp_path / "src")
    b = convert("clear", src, tmp_path / "a", forget_ratios="forget01")
    assert list(b.forget_sets) == ["forget01"]
    with pytest.raises(DataError, match=r"forget ratio 15 does not exist; available: 1, 5, 10"):
        convert("clear", src, tmp_path / "b", forget_ratios=[15])
    shutil.rmtree(src / "real_world")
    with pytest.raises(DataError, match=r"missing subset 'real_world'"):
        convert("clear", src, tmp_path / "c")


# ----------------------------------------------------------------------------------------------------------
# MMUBench (SIU release)


@pytest.fixture(scope="module")
def mmu(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not SHARED_SIU.is_dir():
        pytest.skip(f"MMUBench release files not found at {SHARED_SIU} (shared data directory)")
    return write_mmubench(tmp_path_factory.mktemp("mmu"))


@needs_release
def test_every_release_file_loads(mmu: tuple[Path, Path]) -> None:
    images = mmu[1]
    files = sorted(p.name for p in SHARED_SIU.glob("*.json"))
    assert files == sorted(RELEASE_FILES) == sorted(RELEASE_COUNTS)
    for name in files:
        path = SHARED_SIU / name
        if name in SIU_FILES:
            loaded = read_siu_json(path, images, "donald-trump")
        else:
            loaded = read_prompts(path, PROMPT_FILES[name][1])
        assert len(loaded) == RELEASE_COUNTS[name], name


@needs_release
def test_siu_json_targets(mmu: tuple[Path, Path]) -> None:
    siu = read_siu_json(SHARED_SIU / "SIU.json", mmu[1], "donald-trump")
    assert sum(e.kind == "qa" for e in siu) == 14 and all((e.kind == "vqa") == bool(e.image) for e in siu)
    assert len({e.id for e in siu}) == 25  # the release repeats an id; ours stay unique
    targets = Counter(question_type(e.prompt, e.image is not None, "Donald Trump") for e in siu)
    assert targets == {"identity": 9, "recognition": 2, "fact": 7, "other": 7}  # SIU's 9 / 2 / 7 / 7
    for e in siu:
        kind = question_type(e.prompt, e.image is not None, "Donald Trump")
        assert (e.target_phrase == "Jacob Campbell") == (kind == "identity")
        assert (e.target_phrase == e.answer) == (kind == "recognition")
        assert (e.target_phrase is None) == (kind in ("fact", "other"))
    assert not any(e.prompt.startswith("<image>") for e in siu)
    assert Path(siu[0].image) == (mmu[1] / "Trump_Image118.jpg").resolve()


@needs_release
def test_mmubench_converts(mmu: tuple[Path, Path], tmp_path: Path) -> None:
    data = mmu[0]
    b = Benchmark.load(convert("mmubench", data, tmp_path / "out").root)
    sets = {"siu": 25, "ga": 25, "po": 20, "em": 100, "multilanguage": 305, "multihop": 70, "mia": 800}
    assert Counter(e.meta["set"] for e in b.examples) == sets
    assert split_counts(b) == {("people", "train"): 70, ("test", "eval"): 1275}
    assert b.forget_sets == {"concept": ["donald-trump"]}
    assert len(b.select("forget", "concept", purpose="train")) == 70
    assert len(b.select("test", "concept")) == 1275
    siu = [e for e in b.examples if e.meta["set"] == "siu"]
    assert Counter(e.qtype for e in siu) == {"identity": 9, "recognition": 2, "fact": 7, "other": 7}
    forget_image = b.info["forget_image"]
    assert {e.image for e in b.examples if e.purpose == "train" and e.image} == {forget_image}
    test_images = {e.image for e in b.examples if e.split == "test"}
    assert forget_image not in test_images and len(test_images) == 70 + MMUBENCH_EXTRA_TEST_IMAGES
    em = [e for e in b.examples if e.meta["set"] == "em"]
    assert Counter(e.answer for e in em) == {"yes": 80, "trump": 19, "yes trump": 1}
    assert em[0].meta["target"] == "trump" and all(e.kind == "vqa" for e in em)
    assert len(list((b.root / "images").iterdir())) == 1 + 70 + MMUBENCH_EXTRA_TEST_IMAGES
    assert_images_open(b)


@needs_release
def test_mmubench_assigns_own_images(tmp_path: Path) -> None:
    data, _ = write_mmubench(tmp_path / "fixture")
    own = tmp_path / "my_images"
    own.mkdir()
    for k in range(3):
        (own / f"photo{k}.png").write_bytes(png_bytes(k))
    with pytest.raises(DataError, match=r"SIU.json item 0 field 'image': image '/data1/.*Trump_Image118.jpg' "
                                         r"does not exist"):
        convert("mmubench", data, tmp_path / "a", image_dir=str(own))
    b = convert("mmubench", data, tmp_path / "b", image_dir=str(own), assign_images=True,
                forget_image="photo1.png")
    train_images = {e.image for e in b.examples if e.purpose == "train" and e.image}
    assert train_images == {b.info["forget_image"]}
    assert len({e.image for e in b.examples if e.split == "test"}) == 2  # photo0 and photo2, in turn


@needs_release
def test_mmubench_separate_test_images(tmp_path: Path) -> None:
    """The release mirror keeps the unlearning image in traindon/ and held-out ones in testdon/."""
    data, images = write_mmubench(tmp_path / "fixture")
    train, test = tmp_path / "traindon", tmp_path / "testdon"
    train.mkdir()
    shutil.move(images / "Trump_Image118.jpg", train / "Trump_Image118.jpg")
    shutil.move(images, test)
    b = convert("mmubench", data, tmp_path / "out", image_dir=str(train), test_image_dir=str(test))
    assert b.info["held_out_images"] == 70 + MMUBENCH_EXTRA_TEST_IMAGES
    assert {e.image for e in b.examples if e.purpose == "train" and e.image} == {b.info["forget_image"]}
    assert len({e.image for e in b.examples if e.split == "test"}) == 70 + MMUBENCH_EXTRA_TEST_IMAGES


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_siu_json_malformed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "outside.png").write_bytes(png_bytes(2))
    conv = [{"from": "human", "value": "<image>\nWho is this?"}, {"from": "gpt", "value": "Nobody."}]
    cases = [
        ('[{"id": "x", "conversations": [', r"bad.json: not valid JSON \(line 1 column"),
        ({"id": "x"}, r"bad.json: expected a JSON list"),
        ([{"id": "x", "image": "a.png"}], r"bad.json item 0: missing field 'conversations'"),
        ([{"id": "x", "conversations": conv[:1]}], r"bad.json item 0 field 'conversations'"),
        ([{"id": "x", "image": "/data1/LLaVA/b.png", "conversations": conv}],
         r"bad.json item 0 field 'image': image '/data1/LLaVA/b.png' does not exist"),
        ([{"id": "x", "image": "C:\\data\\b.png", "conversations": conv}],
         r"bad.json item 0 field 'image': image 'C:\\\\data\\\\b.png' does not exist as .*images/b.png"),
        ([{"id": "x", "image": "../outside.png", "conversations": conv}],
         r"bad.json item 0 field 'image': image path '../outside.png' escapes the image directory"),
        ([{"id": 3, "conversations": conv}], r"bad.json item 0 field 'id': expected a string"),
        ([{"id": "x", "conversations": conv, "target_phrase": 1}], r"item 0 field 'target_phrase'"),
    ]
    for data, message in cases:
        with pytest.raises(DataError, match=message):
            read_siu_json(_write_json(tmp_path / "bad.json", data), images)
    for name in ("/any/where/a.png", "D:\\photos\\a.png", "a.png", "sub/../a.png"):
        ok = read_siu_json(_write_json(tmp_path / "ok.json", [{"id": "x", "image": name, "conversations": conv}]),
                           images)
        assert ok[0].image == str((images / "a.png").resolve()) and ok[0].prompt == "Who is this?"
    with pytest.raises(DataError, match=r"prompts.json item 1: missing field 'target'"):
        read_prompts(_write_json(tmp_path / "prompts.json", [{"prompt": "a", "target": "b"}, {"prompt": "c"}]),
                     ("prompt", "target"))


@needs_release
def test_mmubench_release_problems(tmp_path: Path) -> None:
    data, images = write_mmubench(tmp_path / "fixture")
    (data / "miadata.json").write_text('[{"prompt": "x"},]')
    with pytest.raises(DataError, match=r"miadata.json: not valid JSON"):
        convert("mmubench", data, tmp_path / "a")
    (data / "miadata.json").unlink()
    with pytest.raises(DataError, match=r"missing file 'miadata.json'"):
        convert("mmubench", data, tmp_path / "a")
    shutil.copy(SHARED_SIU / "miadata.json", data / "miadata.json")
    (images / "Trump_Image786.jpg").unlink()
    with pytest.raises(DataError, match=r"Multi-hop.json item 0 field 'imgid': image .*Trump_Image786.jpg"):
        convert("mmubench", data, tmp_path / "a")
    for p in images.iterdir():
        if p.name != "Trump_Image118.jpg":
            p.unlink()
    with pytest.raises(DataError, match=r"needs held-out images of Donald Trump"):
        convert("mmubench", data, tmp_path / "a", assign_images=True)
    (images / "Trump_Image118.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"SIU.json item 0 field 'image': image bytes do not decode"):
        convert("mmubench", data, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@needs_release
def test_siu_json_round_trip(mmu: tuple[Path, Path], tmp_path: Path) -> None:
    images = mmu[1]
    for name in SIU_FILES:
        first = read_siu_json(SHARED_SIU / name, images, "donald-trump")
        write_siu_json(first, tmp_path / name)
        assert read_siu_json(tmp_path / name, images, "donald-trump") == first
    original = json.loads((SHARED_SIU / "SIU.json").read_text())
    written = json.loads((tmp_path / "SIU.json").read_text())
    for o, w in zip(original, written):
        assert w["conversations"] == o["conversations"] and w["target_phrase"] == o["target_phrase"]
        assert ("image" in w) == ("image" in o) and w["id"].split("~")[0] == o["id"]
    # examples made by our own data construction: image paths in the image directory, qtypes kept
    made = [
        Example(id="s0", entity="c", kind="vqa", task="gen", prompt="Who is this?", answer="Jacob Campbell.",
                split="people", purpose="train", image=str((images / "extra_0.jpg").resolve()), qtype="identity",
                target_phrase="Jacob Campbell"),
        Example(id="s1", entity="c", kind="qa", task="gen", prompt="Who is Donald Trump?", answer="A politician.",
                split="people", purpose="train"),
    ]
    write_siu_json(made, tmp_path / "made.json")
    assert read_siu_json(tmp_path / "made.json", images, "c") == made
    with pytest.raises(DataError, match="only generation examples"):
        write_siu_json([Example(id="m", entity="c", kind="qa", task="mc", prompt="?", answer="a", split="people",
                                purpose="eval", options=["a", "b"], answer_index=0)], tmp_path / "mc.json")


# ----------------------------------------------------------------------------------------------------------
# convert(): arguments and atomic output


def test_convert_output_directory(clear_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"out: output directory is not empty; pass overwrite=True"):
        convert("clear", clear_src, out)
    assert (out / "keep.txt").read_text() == "mine"
    b = convert("clear", clear_src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "examples.jsonl").is_file() and b.root == out
    # a failed overwrite keeps the previous benchmark and leaves no temporary directory behind
    before = (out / "examples.jsonl").read_text()
    with pytest.raises(DataError):
        convert("clear", clear_src, out, overwrite=True, forget_ratios=[50])
    assert (out / "examples.jsonl").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert("clear", clear_src, empty).root == empty


def test_convert_arguments(clear_src: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown benchmark source 'mllmu'; did you mean 'mllmu-bench'\? "
                                          r"available: mllmu-bench, clear, mmubench"):
        convert("mllmu", clear_src, tmp_path / "o")
    with pytest.raises(ConfigError, match=r"unknown option 'forget_ratio' for clear; did you mean 'forget_ratios'"):
        convert("clear", clear_src, tmp_path / "o", forget_ratio=[5])
    with pytest.raises(DataError, match=r"nowhere: clear data directory does not exist"):
        convert("clear", tmp_path / "nowhere", tmp_path / "o")
    with pytest.raises(DataError, match="would contain the source data"):
        convert("clear", clear_src, clear_src.parent, overwrite=True)
    assert clear_src.is_dir()
