"""The bad-input corpus: each case ends, before any training, in one line on stderr that names the problem,
exit code 2, and leaves no output and no temporary directory behind."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures_formats import write_mllmu
from mmunlearn.cli import main
from mmunlearn.commands import benchmark_corpus
from mmunlearn.data.batches import decode_image
from mmunlearn.errors import DataError
from mmunlearn.models.tiny import save_tiny

FAST_FT = ["--quiet", "--set", "steps=2", "--set", "vision_warmup_steps=1", "--set", "batch_size=4"]
FAST_UL = ["--quiet", "--set", "steps=2", "--set", "batch_size=4", "--set", "forget_set=forget15"]


@pytest.fixture(scope="module")
def vanilla(small_bench, tmp_path_factory) -> Path:
    """A model directory (the untrained tiny model) to unlearn from; its files must never change."""
    path = tmp_path_factory.mktemp("vanilla") / "model"
    save_tiny(path, benchmark_corpus(small_bench))
    return path


@pytest.fixture
def data(tmp_path, small_bench) -> Path:
    """A private copy of the small benchmark, free to break."""
    d = tmp_path / "data"
    shutil.copytree(small_bench.root, d)
    return d


def fails(capsys, out: Path, *argv: str, match: str) -> str:
    """Run the CLI; assert exit 2, one line on stderr containing ``match``, no output and no temp dir."""
    code = main(list(argv))
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.strip().count("\n") == 0, err
    assert match in err, err
    assert not out.exists(), f"{out} was written"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers
    return err


def finetune(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--data", str(data), "--out", str(out), *FAST_FT, *extra]


def unlearn(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["unlearn", "--data", str(data), "--model", str(model), "--out", str(out), "--method", "ga",
            *FAST_UL, *extra]


def rewrite_examples(data: Path, change) -> None:
    lines = (data / "examples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    change(rows)
    (data / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width × height RGB pixels, with almost no data: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---- data --------------------------------------------------------------------------------------------------


def test_corrupt_png_in_a_sampled_example(tmp_path, capsys, data):
    (data / "images" / "person000_view0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    err = fails(capsys, tmp_path / "m", *finetune(data, tmp_path / "m"), match="image does not decode")
    assert "person000_view0.png" in err


def test_corrupt_png_in_an_example_the_run_never_samples(tmp_path, capsys, data):
    # view 2 is a held-out test image: fine-tuning never draws it, validation still reads it
    png = (data / "images" / "person001_view2.png").read_bytes()
    (data / "images" / "person001_view2.png").write_bytes(png[: len(png) // 2])
    err = fails(capsys, tmp_path / "m", *finetune(data, tmp_path / "m"), match="image does not decode")
    assert "person001_view2.png" in err and "field 'image'" in err


def test_path_traversal(tmp_path, capsys, data):
    rewrite_examples(data, lambda rows: next(r for r in rows if r["image"]).update(image="../../etc/passwd"))
    fails(capsys, tmp_path / "m", *finetune(data, tmp_path / "m"), match="escapes the data directory")


def test_decompression_bomb(tmp_path, capsys, data):
    (data / "images" / "person002_view1.png").write_bytes(bomb_png(30000, 30000))
    err = fails(capsys, tmp_path / "m", *finetune(data, tmp_path / "m"), match="decompression bomb")
    assert "person002_view1.png" in err


def test_pillow_warning_range_is_refused_too():
    # between one and two times the pixel limit Pillow only warns; the tool refuses
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    with pytest.raises(DataError, match="decompression bomb"):
        decode_image(bomb_png(side, side), "x.png")


def test_oversize_image_file(tmp_path, capsys, data, monkeypatch):
    import mmunlearn.data.batches as B

    monkeypatch.setattr(B, "MAX_IMAGE_BYTES", 100)
    fails(capsys, tmp_path / "m", *finetune(data, tmp_path / "m"), match="over the limit of 100")


def test_missing_field_in_examples(tmp_path, capsys, data):
    rewrite_examples(data, lambda rows: rows[3].pop("answer"))
    fails(capsys, tmp_path / "m", *finetune(data, tmp_path / "m"), match="'answer'")


def test_wrong_field_type_in_examples(tmp_path, capsys, data):
    rewrite_examples(data, lambda rows: rows[5].update(image=7, kind="vqa"))
    fails(capsys, tmp_path / "m", *finetune(data, tmp_path / "m"), match="field 'image' must be a string")


def test_truncated_parquet(tmp_path, capsys):
    src = write_mllmu(tmp_path / "src", train=False)
    f = min((src / "Full_Set").glob("*.parquet"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = fails(capsys, tmp_path / "bench", "make-data", "--from", "mllmu-bench", str(src), "--out",
                str(tmp_path / "bench"), match="not a readable parquet file")
    assert f.name in err


def test_parquet_missing_column(tmp_path, capsys):
    src = write_mllmu(tmp_path / "src", train=False)
    f = min((src / "Test_Set").glob("*.parquet"))
    pq.write_table(pq.read_table(f).drop(["images"]), f)
    fails(capsys, tmp_path / "bench", "make-data", "--from", "mllmu-bench", str(src), "--out",
          str(tmp_path / "bench"), match="missing column 'images'")


# ---- forget set --------------------------------------------------------------------------------------------


def test_empty_forget_set(tmp_path, capsys, data, vanilla):
    meta = json.loads((data / "benchmark.json").read_text())
    meta["forget_sets"]["forget15"] = []
    (data / "benchmark.json").write_text(json.dumps(meta))
    fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u"),
          match="forget_sets.forget15': the forget set is empty")


def test_forget_retain_overlap(tmp_path, capsys, data, vanilla):
    forget = json.loads((data / "benchmark.json").read_text())["forget_sets"]["forget15"]
    retain = next(f"person{i:03d}" for i in range(8) if f"person{i:03d}" not in forget)
    shutil.copy(data / "images" / f"{forget[0]}_view0.png", data / "images" / f"{retain}_view1.png")
    err = fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u"), match="forget and retain overlap")
    assert retain in err and forget[0] in err


def test_unknown_entity(tmp_path, capsys, data, vanilla):
    fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u", "--set", "entities=[nobody]"),
          match="entity 'nobody' is not in")


def test_unknown_entity_in_a_forget_set(tmp_path, capsys, data, vanilla):
    meta = json.loads((data / "benchmark.json").read_text())
    meta["forget_sets"]["forget15"] = ["person000", "ghost"]
    (data / "benchmark.json").write_text(json.dumps(meta))
    fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u"), match="entity 'ghost' is not in")


# ---- model, output, options --------------------------------------------------------------------------------


def test_unknown_family(tmp_path, capsys, data, vanilla):
    fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u", "--family", "gpt5"),
          match="unknown model family 'gpt5'")


def test_family_does_not_match_the_model(tmp_path, capsys, data, vanilla):
    fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u", "--family", "qwen2-vl"),
          match="not family 'qwen2-vl'")


def test_model_directory_without_weights(tmp_path, capsys, data, vanilla):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(vanilla / "config.json", bare / "config.json")
    fails(capsys, tmp_path / "u", *unlearn(data, bare, tmp_path / "u"), match="no weights")


def test_unknown_config_key(tmp_path, capsys, data, vanilla):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: ga\nlearning_rate: 0.1\n")
    err = fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u", "--config", str(cfg)),
                match="unknown option 'learning_rate'")
    assert str(cfg) in err


def test_unknown_override_key(tmp_path, capsys, data, vanilla):
    fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u", "--set", "stepz=3"),
          match="did you mean 'steps'")


def test_existing_output_directory(tmp_path, capsys, data, vanilla):
    out = tmp_path / "u"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(unlearn(data, vanilla, out))
    _, err = capsys.readouterr()
    assert code == 2 and "exists and is not empty" in err and err.strip().count("\n") == 0
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".u.")]


def test_output_into_the_base_model(tmp_path, capsys, data, vanilla):
    before = sorted(p.name for p in vanilla.iterdir())
    code = main(unlearn(data, vanilla, vanilla / "unlearned"))
    _, err = capsys.readouterr()
    assert code == 2 and "would write into" in err and err.strip().count("\n") == 0
    assert sorted(p.name for p in vanilla.iterdir()) == before


def test_output_into_the_data_directory(tmp_path, capsys, data, vanilla):
    code = main(unlearn(data, vanilla, data / "unlearned"))
    _, err = capsys.readouterr()
    assert code == 2 and "would write into" in err
    assert not (data / "unlearned").exists()


# ---- numerical guard ---------------------------------------------------------------------------------------


def test_nan_loss_stops_the_run_before_anything_is_saved(tmp_path, capsys, data, vanilla):
    err = fails(capsys, tmp_path / "u", *unlearn(data, vanilla, tmp_path / "u", "--set", "lr=1e12",
                                                 "--set", "steps=5"), match="non-finite")
    assert "at step" in err and "last finite loss" in err


def test_nan_steps_can_be_skipped_and_are_counted(tmp_path, capsys, data, vanilla):
    import torch

    import mmunlearn.methods.ga as ga

    calls = {"n": 0}
    real = ga.GradientAscent.loss

    def sometimes_nan(self, ctx, batches):
        loss, logs = real(self, ctx, batches)
        calls["n"] += 1
        return (loss * torch.tensor(float("nan")) if calls["n"] == 2 else loss), logs

    out = tmp_path / "u"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ga.GradientAscent, "loss", sometimes_nan)
        code = main(unlearn(data, vanilla, out, "--set", "steps=3", "--set", "on_nonfinite=skip"))
    _, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads((out / "mmunlearn_run.json").read_text())
    assert rec["skipped_steps"] == [1]
    assert rec["history"][1]["loss"] is None and rec["history"][1]["skipped"] == 1.0
