import json
from collections import Counter

import datasets
import pytest

from mmunlearn.data.fictitious import FictitiousConfig, make_fictitious
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import DataError


def test_generation_is_deterministic(tmp_path):
    cfg = FictitiousConfig(num_people=6, train_images=1, test_images=1)
    a = make_fictitious(tmp_path / "a", cfg)
    b = make_fictitious(tmp_path / "b", cfg)
    assert (a.root / "examples.jsonl").read_bytes() == (b.root / "examples.jsonl").read_bytes()
    assert (a.root / "images/person000_view0.png").read_bytes() == (b.root / "images/person000_view0.png").read_bytes()
    c = make_fictitious(tmp_path / "c", FictitiousConfig(num_people=6, train_images=1, test_images=1, seed=1))
    assert (c.root / "examples.jsonl").read_bytes() != (a.root / "examples.jsonl").read_bytes()


def test_identity_views_add_images_and_change_nothing_else(tmp_path):
    """The warm-up's question-free views come from their own random stream: a benchmark with them has the same
    questions and images as one without, and no example points at them."""
    kw = dict(num_people=5, train_images=2, test_images=1)
    plain = make_fictitious(tmp_path / "plain", FictitiousConfig(identity_views=0, **kw))
    full = make_fictitious(tmp_path / "full", FictitiousConfig(identity_views=3, **kw))
    assert (plain.root / "examples.jsonl").read_bytes() == (full.root / "examples.jsonl").read_bytes()
    for img in {e.image for e in plain.examples if e.image}:
        assert (plain.root / img).read_bytes() == (full.root / img).read_bytes()
    views = full.identity_views()
    assert set(views) == set(full.info["entities"]) and all(len(v) == 3 for v in views.values())
    used = {str((full.root / e.image).resolve()) for e in full.examples if e.image}
    assert not used & {str(p) for v in views.values() for p in v}
    # two views of one person differ (pose, light), and views of a seed are reproducible
    a, b = views["person000"][:2]
    assert a.read_bytes() != b.read_bytes()
    again = make_fictitious(tmp_path / "again", FictitiousConfig(identity_views=3, **kw))
    assert again.identity_views()["person004"][2].read_bytes() == views["person004"][2].read_bytes()
    assert plain.identity_views() == {}


def test_describe_adds_free_form_questions_and_changes_nothing_else(tmp_path):
    """Descriptions are extra examples at the end of each person's block: the other examples and images of a
    seed are the same with or without them."""
    from mmunlearn.data.fictitious import DESCRIBE_VQA

    kw = dict(num_people=5, train_images=2, test_images=2)
    plain = make_fictitious(tmp_path / "plain", FictitiousConfig(**kw))
    full = make_fictitious(tmp_path / "full", FictitiousConfig(describe=True, **kw))
    desc = [e for e in full.examples if e.qtype == "describe"]
    assert [e for e in full.examples if e.qtype != "describe"] == plain.examples
    assert not [e for e in plain.examples if e.qtype == "describe"]
    names = full.entity_names()
    for pid in full.info["entities"]:
        mine = [e for e in desc if e.entity == pid]
        train = [e for e in mine if e.purpose == "train"]
        assert sorted((e.image, e.prompt) for e in train) == sorted(
            (f"images/{pid}_view{v}.png", q) for v in range(2) for q in DESCRIBE_VQA)
        evals = [e for e in mine if e.purpose == "eval"]  # view 0 (forget/retain) and the held-out views (test)
        assert sorted((e.split, e.image) for e in evals) == [
            ("people", f"images/{pid}_view0.png"), ("test", f"images/{pid}_view2.png"),
            ("test", f"images/{pid}_view3.png")]
        assert all(e.kind == "vqa" and e.task == "gen" for e in mine)
        assert all(e.answer.startswith(f"This is {names[pid]}, ") and len(e.answer.split()) >= 17 for e in mine)


@pytest.mark.parametrize("views, msg", [
    ({"person000": "images/x.png"}, "must map entity ids to lists"),
    ({"person000": ["../outside.png"]}, "escapes the data directory"),
    ({"person000": ["images/missing.png"]}, "names a missing file"),
])
def test_identity_views_bad_entries_are_refused(tmp_path, views, msg):
    bench = make_fictitious(tmp_path / "b", FictitiousConfig(num_people=4, train_images=1, test_images=1,
                                                               identity_views=1))
    bench.info["identity_views"] = views
    with pytest.raises(DataError, match=msg):
        bench.identity_views()


def test_negative_identity_views_is_refused():
    with pytest.raises(DataError, match="identity_views must be >= 0"):
        FictitiousConfig(identity_views=-1)


def test_default_benchmark_shape(tmp_path):
    bench = make_fictitious(tmp_path / "d")
    people = bench.info["entities"]
    assert len(people) >= 40
    assert set(bench.forget_sets) == {"forget05", "forget10", "forget15"}
    assert set(bench.forget_sets["forget05"]) < set(bench.forget_sets["forget10"]) < set(bench.forget_sets["forget15"])
    for pid in bench.forget_sets["forget15"]:
        test_images = {e.image for e in bench.select("test", [pid])}
        assert len(test_images) >= 3
        train_images = {e.image for e in bench.examples if e.entity == pid and e.purpose == "train" and e.image}
        assert not test_images & train_images  # held out from all training
        assert len(bench.select("forget", [pid], purpose="eval")) >= 10
    kinds = Counter((e.kind, e.task) for e in bench.select("forget", "forget10", purpose="eval"))
    assert {("vqa", "mc"), ("qa", "mc"), ("vqa", "cloze"), ("qa", "cloze"), ("vqa", "gen"), ("qa", "gen")} <= set(kinds)
    assert bench.select("utility", "forget10")
    # unseen names are never given to a person
    assert not set(bench.info["unseen_names"]) & {p["name"] for p in people.values()}


def test_datasets_reads_examples(small_bench):
    ds = datasets.load_dataset("json", data_files=str(small_bench.root / "examples.jsonl"), split="train")
    assert len(ds) == len(small_bench.examples)
    assert ds[0]["id"] == small_bench.examples[0].id


def test_roundtrip_and_select(small_bench):
    again = Benchmark.load(small_bench.root)
    assert again.examples == small_bench.examples
    f = again.select("forget", "forget15")
    r = again.select("retain", "forget15")
    assert f and r and not {e.entity for e in f} & {e.entity for e in r}
    with pytest.raises(DataError, match="forget set 'forget99' does not exist"):
        again.select("forget", "forget99")


def test_schema_rejects_bad_examples():
    with pytest.raises(DataError, match="field 'kind'"):
        Example(id="x", entity="e", kind="audio", task="gen", prompt="p", answer="a", split="people", purpose="train")
    with pytest.raises(DataError, match="does not match image"):
        Example(id="x", entity="e", kind="vqa", task="gen", prompt="p", answer="a", split="people", purpose="train")
    with pytest.raises(DataError, match="multiple choice"):
        Example(id="x", entity="e", kind="qa", task="mc", prompt="p", answer="a", split="people", purpose="eval")


def test_load_errors(tmp_path, small_bench):
    with pytest.raises(DataError, match="does not exist"):
        Benchmark.load(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "benchmark.json").write_text(json.dumps({"forget_sets": {}}))
    (bad / "examples.jsonl").write_text('{"id": "a"\n')
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        Benchmark.load(bad)
    (bad / "examples.jsonl").write_text(json.dumps({"id": "a", "colour": 1}) + "\n")
    with pytest.raises(DataError, match="unknown field"):
        Benchmark.load(bad)
    e = small_bench.examples[0]
    escaped = Example(**{**vars(e), "image": "../../etc/passwd", "kind": "vqa"})
    with pytest.raises(DataError, match="escapes the data directory"):
        small_bench.image_path(escaped)


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        make_fictitious(out, FictitiousConfig(num_people=4, train_images=1, test_images=1))
    assert (out / "keep.txt").read_text() == "mine"
