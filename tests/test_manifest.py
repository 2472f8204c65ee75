"""Every output carries a manifest that ``manifest check`` verifies; no command ever changes the base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmunlearn.cli import main
from mmunlearn.commands import benchmark_corpus
from mmunlearn.manifest import hash_tree
from mmunlearn.models.tiny import save_tiny

FT = ["--quiet", "--set", "steps=2", "--set", "vision_warmup_steps=1", "--set", "batch_size=4"]
UL = ["--quiet", "--set", "steps=2", "--set", "batch_size=4", "--set", "forget_set=forget15"]
EV = ["--quiet", "--set", "forget_set=forget15", "--set", "limit=4", "--set", "max_new_tokens=4",
      "--set", "cache=false"]


@pytest.fixture(scope="module")
def vanilla(small_bench, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vanilla") / "model"
    save_tiny(path, benchmark_corpus(small_bench))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def all_bytes(path: Path) -> dict[str, str]:
    """sha256 of every file, hidden ones and the manifest included: the strictest notion of unchanged."""
    from mmunlearn.manifest import sha256_file

    return {str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()}


def test_base_model_is_byte_identical_after_every_command(tmp_path, capsys, small_bench, vanilla):
    data = str(small_bench.root)
    before = all_bytes(vanilla)
    commands = [  # (argv, expected exit code)
        (["finetune", "--data", data, "--model", str(vanilla), "--out", str(tmp_path / "ft"), *FT], 0),
        (["unlearn", "--data", data, "--model", str(vanilla), "--method", "mmunlearner", "--out",
          str(tmp_path / "mmu"), *UL, "--set", "method_options.importance_batches=1"], 0),
        (["unlearn", "--data", data, "--model", str(vanilla), "--method", "npo", "--out", str(tmp_path / "npo"),
          *UL, "--set", "lora={r: 4}", "--set", "merge=false"], 0),
        (["unlearn", "--data", data, "--model", str(vanilla), "--method", "ga", "--out", str(tmp_path / "nan"),
          *UL, "--set", "lr=1e12", "--set", "steps=4"], 2),  # non-finite loss
        (["unlearn", "--data", data, "--model", str(vanilla), "--method", "ga", "--out", str(vanilla / "x"), *UL], 2),
        (["evaluate", "--data", data, "--model", str(vanilla), "--out", str(tmp_path / "ev" / "r.json"), *EV], 0),
        (["evaluate", "--data", data, "--model", str(vanilla), "--out", str(vanilla / "r.json"), *EV], 2),
        (["manifest", "check", str(tmp_path / "mmu")], 0),
    ]
    for argv, expected in commands:
        code, _, err = run(capsys, *argv)
        assert code == expected, (argv, err)
        assert all_bytes(vanilla) == before, f"{argv[0]} changed the base model"
    assert (tmp_path / "mmu" / "model.safetensors").is_file() and (tmp_path / "npo").is_dir()
    assert not (tmp_path / "nan").exists()


def test_manifest_records_and_checks_a_run(tmp_path, capsys, small_bench, vanilla):
    data = tmp_path / "data"
    shutil.copytree(small_bench.root, data)
    out = tmp_path / "u"
    code, _, err = run(capsys, "unlearn", "--data", str(data), "--model", str(vanilla), "--method", "ga",
                       "--out", str(out), *UL, "--set", "seed=3")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"] == "unlearn" and m["seed"] == 3 and m["config"]["method"] == "ga"
    assert m["config"]["lr"] is not None  # the resolved configuration, method defaults filled in
    assert m["packages"]["torch"] and m["hardware"]["cpu_count"] >= 1 and m["wall_seconds"] > 0
    assert m["inputs"]["data"]["files"] == hash_tree(data)
    assert m["inputs"]["base_model"]["files"] == hash_tree(vanilla)
    assert set(m["outputs"]) >= {"model.safetensors", "mmunlearn_run.json", "unlearn_config.yaml"}
    assert m["git"] is None or len(m["git"]["commit"]) == 40

    code, text, _ = run(capsys, "manifest", "check", str(out))
    assert code == 0 and "match" in text

    # an output changed, an input changed, an output appeared: each named, exit 1
    (out / "unlearn_config.yaml").write_text("lr: 5\n")
    (data / "images" / "person000_view0.png").write_bytes(b"changed")
    (out / "extra.txt").write_text("?")
    code, text, _ = run(capsys, "manifest", "check", str(out))
    assert code == 1
    lines = text.strip().splitlines()
    assert any("unlearn_config.yaml" in line and "differs" in line for line in lines), text
    assert any("person000_view0.png" in line and line.startswith("input data") for line in lines), text
    assert any("extra.txt" in line and "not in the manifest" in line for line in lines), text


def test_evaluate_writes_a_manifest_beside_its_results(tmp_path, capsys, small_bench, vanilla):
    res = tmp_path / "r.json"
    code, _, err = run(capsys, "evaluate", "--data", str(small_bench.root), "--model", str(vanilla), "--out",
                       str(res), *EV)
    assert code == 0, err
    m = json.loads((tmp_path / "r.manifest.json").read_text())
    assert set(m["outputs"]) == {"r.json", "r.md"} and m["inputs"]["model"]["files"] == hash_tree(vanilla)
    assert run(capsys, "manifest", "check", str(res))[0] == 0
    res.write_text("{}")
    code, text, _ = run(capsys, "manifest", "check", str(res))
    assert code == 1 and "r.json" in text


def test_manifest_check_without_a_manifest(tmp_path, capsys):
    code, _, err = run(capsys, "manifest", "check", str(tmp_path))
    assert code == 2 and "no manifest" in err
