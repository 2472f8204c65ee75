"""bench/sweep.py: a method's grid over configurations and seeds, through the CLI, into one table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sweep", ROOT / "bench" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def results(fv, fq, rv, rq, name=100.0, held=100.0, mc_n=40):
    unit = lambda acc: {"mc_acc": acc, "mc_n": mc_n}  # noqa: E731
    return {"results": {
        "forget": {"vqa": unit(fv), "qa": unit(fq)},
        "retain": {"vqa": {**unit(rv), "name_rate": name, "gen_n": 30, "name_rate_heldout": held,
                           "name_heldout_n": 90}, "qa": {**unit(rq), "gen_rougeL": rq / 100}},
        "test": {"vqa": {**unit(fv), "name_rate": 0.0, "gen_n": 12}, "qa": unit(fq)},
    }}


def write(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_grid_points_and_configs():
    assert sweep.grid_points(["lr=1e-3,5e-4", "epochs=1"]) == [["lr=1e-3", "epochs=1"], ["lr=5e-4", "epochs=1"]]
    assert sweep.grid_points([]) == [[]]
    assert sweep.config_id(sweep.parse_config("people=60,forget=forget15")) == "p60-forget15"
    assert sweep.config_id(sweep.parse_config("people=80,forget=forget10,identity=24")) == "p80-forget10-i24"
    for bad in ("people=60", "people=60,forget=forget10,colour=red"):
        with pytest.raises(SystemExit):
            sweep.parse_config(bad)
    with pytest.raises(SystemExit):
        sweep.grid_points(["lr"])


def test_table_means_seeds_marks_noise_and_counts_bounds(tmp_path):
    for seed, (good, bad) in enumerate([(20.0, 90.0), (30.0, 92.0)]):
        root = tmp_path / f"p40-forget10-s{seed}"
        write(root / "vanilla.json", results(100.0, 100.0, 100.0, 100.0))
        write(root / "runs/mmunlearner/lr=1e-3/eval.json", results(good, 95.0, 98.0, 99.0))
        write(root / "runs/mmunlearner/lr=1e-2/eval.json", results(bad, 40.0, 60.0, 50.0, name=10.0))
    text = sweep.render(tmp_path)
    row = next(x for x in text.splitlines() if x.startswith("| mmunlearner lr=1e-3 |"))
    assert "25.0 ± 7.1" in row and row.rstrip().endswith("| 2/2 |")
    bad_row = next(x for x in text.splitlines() if x.startswith("| mmunlearner lr=1e-2 |"))
    assert bad_row.rstrip().endswith("| 0/2 |")
    assert "forget vqa mc_acc <= 35" in text and "retain vqa name_rate >= 0.85 × vanilla" in text
    assert "| mmunlearner lr=1e-3 | p40-forget10: 2/2 |" in text


def test_single_seed_noise_uses_the_question_counts(tmp_path):
    root = tmp_path / "p40-forget10-s0"
    write(root / "vanilla.json", results(100.0, 100.0, 100.0, 100.0, mc_n=40))
    write(root / "runs/siu/defaults/eval.json", results(97.5, 97.5, 97.5, 40.0, mc_n=40))
    row = next(x for x in sweep.render(tmp_path).splitlines() if x.startswith("| siu defaults |"))
    cells = [c.strip() for c in row.split("|")[2:-2]]
    assert cells[2] == "≈ 97.5"  # 1 question of 40: noise
    assert cells[3] == "40.0"  # 24 of 40: a result


def test_a_sweep_through_the_cli(tmp_path):
    """One small configuration end to end: data, a vanilla model, a grid point, the table."""
    import subprocess

    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "bench" / "sweep.py"), "--out", str(out), "--config", "people=6,forget=forget15",
           "--method", "ga", "--grid", "steps=1", "--finetune-set", "steps=4", "--finetune-set",
           "vision_warmup_steps=0", "--finetune-set", "stop_accuracy=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / "sweep.md").read_text()
    assert "## p6-forget15 (seeds 0)" in text and "| ga steps=1 |" in text
    data = json.loads((out / "sweep.json").read_text())
    assert set(data["p6-forget15"]) == {"vanilla", "ga steps=1"}
    assert data["p6-forget15"]["ga steps=1"]["0"]["forget"]["vqa"]["mc_n"] > 0
    # a bad option fails the sweep with the CLI's one-line error, and the table is still written
    proc = subprocess.run(cmd[:-8] + ["--grid", "no_such_option=1"], capture_output=True, text=True)
    assert proc.returncode == 1 and "no_such_option" in proc.stderr


def test_percentages_keep_one_decimal_below_one_percent_and_rouge_three(tmp_path):
    root = tmp_path / "p40-forget10-s0"
    write(root / "vanilla.json", results(100.0, 100.0, 100.0, 100.0))
    write(root / "runs/mmunlearner/defaults/eval.json", results(0.56, 95.0, 98.0, 99.0))
    row = next(x for x in sweep.render(tmp_path).splitlines() if x.startswith("| mmunlearner defaults |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0] == "0.6" and cells[-2] == "0.990"
