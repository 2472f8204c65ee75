"""Property-based checks: the data loaders and the option parser, fed random malformed records, either
succeed or raise one of the tool's own errors (never a raw Python exception)."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fixtures_formats import png_bytes, write_mllmu
from mmunlearn import config as C
from mmunlearn.data.batches import decode_image
from mmunlearn.data.convert import convert
from mmunlearn.data.fictitious import FictitiousConfig
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import MMUError
from mmunlearn.eval.runner import EvalConfig
from mmunlearn.train.finetune import FinetuneConfig
from mmunlearn.train.unlearn import UnlearnConfig
from mmunlearn.validate import check_examples, check_forget, check_images, forget_source

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
FIELDS = ["id", "entity", "kind", "task", "prompt", "answer", "split", "purpose", "image", "options",
          "answer_index", "qtype", "target_phrase", "meta"]
GOOD = {"id": "a-0", "entity": "a", "kind": "vqa", "task": "mc", "prompt": "Who?", "answer": "Ann", "split": "people",
        "purpose": "train", "image": "images/a.png", "options": ["Ann", "Bob"], "answer_index": 0}


def tool_errors_only(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except MMUError:
        pass


# ---- records of the benchmark schema -----------------------------------------------------------------------


@FAST
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=14))
def test_random_example_records(record):
    tool_errors_only(Example.from_dict, record, "examples.jsonl line 1")


@FAST
@given(st.sampled_from(FIELDS), json_values)
def test_one_field_of_a_valid_record_replaced(field, value):
    tool_errors_only(Example.from_dict, {**GOOD, field: value}, "examples.jsonl line 1")


@SLOW
@given(
    lines=st.lists(st.one_of(st.text(max_size=30), json_values.map(json.dumps),
                             st.sampled_from(FIELDS).flatmap(lambda f: json_values.map(
                                 lambda v: json.dumps({**GOOD, f: v})))), max_size=4),
    meta=st.one_of(json_values, st.fixed_dictionaries({"forget_sets": json_values})),
    image=st.one_of(st.binary(max_size=64), st.just(png_bytes(1))),
)
def test_random_benchmark_directories(lines, meta, image):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "images").mkdir()
        (root / "images" / "a.png").write_bytes(image)
        (root / "examples.jsonl").write_text("\n".join(lines))
        (root / "benchmark.json").write_text(json.dumps(meta))

        def load_and_validate():
            bench = Benchmark.load(root)
            check_examples(bench)
            hashes = check_images(bench)
            for name in bench.forget_sets:
                forget, where = forget_source(bench, name, None)
                check_forget(bench, forget, hashes, where)

        tool_errors_only(load_and_validate)


# ---- images ------------------------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_as_an_image(data):
    tool_errors_only(decode_image, data, "x.png")


@FAST
@given(st.integers(0, len(png_bytes(3)) - 1), st.binary(min_size=1, max_size=8), st.booleans())
def test_damaged_png(pos, patch, truncate):
    good = png_bytes(3)
    data = good[:pos] if truncate else good[:pos] + patch + good[pos + len(patch):]
    tool_errors_only(decode_image, data, "x.png")


# ---- MLLMU-Bench parquet -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mllmu_src(tmp_path_factory) -> Path:
    return write_mllmu(tmp_path_factory.mktemp("mllmu") / "src", train=False)


@SLOW
@given(data=st.data())
def test_damaged_parquet_files(mllmu_src, data):
    files = sorted(mllmu_src.rglob("*.parquet"))
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        shutil.copytree(mllmu_src, src)
        f = src / data.draw(st.sampled_from(files)).relative_to(mllmu_src)
        raw = bytearray(f.read_bytes())
        if data.draw(st.booleans()):
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        f.write_bytes(bytes(raw))
        tool_errors_only(convert, "mllmu-bench", src, Path(d) / "out")


@SLOW
@given(column=st.sampled_from(["ID", "biography", "image", "Classification_Task", "Generation_Task", "Mask_Task"]),
       value=st.one_of(st.none(), st.text(max_size=10), st.integers(), st.lists(st.text(max_size=5), max_size=2),
                       st.dictionaries(st.sampled_from(["bytes", "path", "Question", "Options"]),
                                       st.text(max_size=5), max_size=2)))
@example(column="image", value={"bytes": "0"})  # text where bytes belong
def test_malformed_parquet_records(mllmu_src, column, value):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        shutil.copytree(mllmu_src, src)
        f = min((src / "Full_Set").glob("*.parquet"))
        rows = pq.read_table(f).to_pylist()
        for r in rows:
            r[column] = value
        buf = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(rows), buf)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            return  # not representable as parquet at all
        f.write_bytes(buf.getvalue())
        tool_errors_only(convert, "mllmu-bench", src, Path(d) / "out")


# ---- options -----------------------------------------------------------------------------------------------

override_items = st.one_of(
    st.text(max_size=20),
    st.tuples(st.lists(st.sampled_from(["steps", "lr", "lora", "r", "method_options", "", "x"]), min_size=1,
                       max_size=3), st.text(max_size=12)).map(lambda kv: ".".join(kv[0]) + "=" + kv[1]),
)


@FAST
@given(st.lists(override_items, max_size=4))
def test_random_overrides(items):
    for cls in (UnlearnConfig, FinetuneConfig):
        tool_errors_only(C.load, cls, None, items)


@FAST
@given(st.sampled_from([UnlearnConfig, FinetuneConfig, EvalConfig, FictitiousConfig]), st.data())
def test_random_option_mappings(cls, data):
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    mapping = data.draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=5), json_values, max_size=4))
    tool_errors_only(C.build, cls, mapping, "options")


@FAST
@given(st.text(max_size=60))
@example("?")  # a mapping whose only key is null
def test_random_yaml_files(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(text)
        tool_errors_only(C.load, UnlearnConfig, p, [])
