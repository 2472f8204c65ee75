"""Bad input to every command ends in one line on stderr and exit code 2; good input works."""

import shutil

import pytest

from mmunlearn.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, match):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.strip().count("\n") == 0, err
    assert match in err, err


FAST = ["--quiet", "--set", "steps=2", "--set", "vision_warmup_steps=1", "--set", "batch_size=4"]


def test_make_data_and_errors(tmp_path, capsys):
    code, out, _ = run(capsys, "make-data", "--out", str(tmp_path / "d"), "--set", "num_people=4",
                       "--set", "train_images=1", "--set", "test_images=1")
    assert code == 0 and "wrote" in out
    one_line_error(capsys, "make-data", "--out", str(tmp_path / "d"), match="not empty")
    one_line_error(capsys, "make-data", "--out", str(tmp_path / "e"), "--set", "num_peple=4",
                   match="did you mean 'num_people'")
    one_line_error(capsys, "make-data", "--out", str(tmp_path / "e"), "--set", "num_people=many", match="expected int")
    one_line_error(capsys, "make-data", "--out", str(tmp_path / "e"), "--config", str(tmp_path / "no.yaml"),
                   match="config file does not exist")
    one_line_error(capsys, "make-data", "--out", str(tmp_path / "e"), "--from", "mllmu-bench", str(tmp_path / "nope"),
                   match=str(tmp_path / "nope"))


def test_finetune_errors(tmp_path, capsys, small_bench):
    one_line_error(capsys, "finetune", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m"),
                   match="benchmark directory does not exist")
    one_line_error(capsys, "finetune", "--data", str(small_bench.root), "--model", str(tmp_path / "nomodel"),
                   "--out", str(tmp_path / "m"), match="model directory does not exist")
    one_line_error(capsys, "finetune", "--data", str(small_bench.root), "--family", "gpt5", "--out",
                   str(tmp_path / "m"), match="unknown model family 'gpt5'")
    one_line_error(capsys, "finetune", "--data", str(small_bench.root), "--out", str(tmp_path / "m"), "--set",
                   "trainable=[eyes]", match="unknown parameter group")
    assert not (tmp_path / "m").exists()


def test_corrupt_image_and_malformed_file(tmp_path, capsys, small_bench):
    data = tmp_path / "data"
    shutil.copytree(small_bench.root, data)
    (data / "images" / "person000_view0.png").write_bytes(b"not a png")
    one_line_error(capsys, "finetune", "--data", str(data), "--out", str(tmp_path / "m"), *FAST,
                   match="image does not decode")
    assert not (tmp_path / "m").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp")]
    (data / "examples.jsonl").write_text("{broken\n")
    one_line_error(capsys, "evaluate", "--data", str(data), "--model", str(tmp_path / "m"), match="not valid JSON")


def test_finetune_evaluate_roundtrip(tmp_path, capsys, small_bench):
    out = tmp_path / "model"
    code, _, err = run(capsys, "finetune", "--data", str(small_bench.root), "--out", str(out), *FAST)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "mmunlearn_run.json").is_file()
    one_line_error(capsys, "finetune", "--data", str(small_bench.root), "--model", str(out), "--out",
                   str(out / "sub"), *FAST, match="would write into")
    res = tmp_path / "r.json"
    code, out_text, err = run(capsys, "evaluate", "--data", str(small_bench.root), "--model", str(out), "--out",
                              str(res), "--quiet", "--set", "forget_set=forget15")
    assert code == 0, err
    assert res.is_file() and res.with_suffix(".md").is_file()
    assert "forget VQA mc_acc" in out_text
    one_line_error(capsys, "evaluate", "--data", str(small_bench.root), "--model", str(out), "--set",
                   "forget_set=forget42", match="forget set 'forget42' does not exist")
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert"}')
    one_line_error(capsys, "evaluate", "--data", str(small_bench.root), "--model", str(bad), match="not supported")


@pytest.mark.parametrize("argv", [["finetune"], ["evaluate", "--data", "x"]])
def test_missing_arguments_exit_nonzero(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
