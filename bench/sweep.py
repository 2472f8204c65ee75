"""Sweep: methods' option grids over several configurations of the built-in benchmark and several seeds,
through the CLI only, into one table with the methods' bounds checked (``mmunlearn.eval.bounds``).

    python bench/sweep.py --out runs/sweep --config people=40,forget=forget10 --config people=80,forget=forget05 \\
        --seeds 0 1 --method mmunlearner --grid lr=5e-4,1e-3 --grid epochs=0.5,1
    python bench/sweep.py --out runs/sweep --method siu             # another method, same configurations
    python bench/sweep.py --out runs/sweep --table                  # rebuild sweep.md / sweep.json only

A configuration is ``people=N,forget=NAME`` (optionally ``views=N``, training views per person, and
``identity=N``, question-free views per person for the vision warm-up); each seed
makes its own benchmark (``make-data --set seed=S``), vanilla model and unlearned models, all with that seed.
Everything already computed under ``--out`` is reused, so calls add to one sweep (``--finetune-set`` options only
apply where a vanilla model is trained: give a new ``--out`` to compare fine-tuning recipes). Per configuration
the table gives vanilla and every method × grid point as mean ± sd over the seeds; "≈" marks a value within the noise of
vanilla's (``mmunlearn.eval.noise``), and "bounds" counts the seeds on which every bound of the method holds.
The summary ranks each method's grid points by the configurations on which they meet all bounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from mmunlearn.eval.bounds import BOUNDS, check
from mmunlearn.eval.noise import mean_sd, within_noise
from mmunlearn.report import COUNTS

COLUMNS = [  # (split, kind, metric, label)
    ("forget", "vqa", "mc_acc", "forget VQA MC"), ("forget", "qa", "mc_acc", "forget QA MC"),
    ("retain", "vqa", "mc_acc", "retain VQA MC"), ("retain", "qa", "mc_acc", "retain QA MC"),
    ("test", "vqa", "mc_acc", "test VQA MC"), ("test", "qa", "mc_acc", "test QA MC"),
    ("test", "vqa", "name_rate", "name held-out forget"), ("retain", "vqa", "name_rate", "name retain"),
    ("retain", "vqa", "name_rate_heldout", "name held-out retain"), ("retain", "qa", "gen_rougeL", "ROUGE-L retain QA"),
]
EVAL_SETS = ["protocols=[]", "splits=[forget,retain,test,utility]"]
CONFIG_KEYS = {"people": "num_people", "views": "train_images", "identity": "identity_views"}


def cli(*args: str, log: Path) -> None:
    """Run ``mmunlearn <args>``; its output goes to ``log``; a failure raises with the CLI's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "mmunlearn", *args], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        raise RuntimeError(f"mmunlearn {args[0]} failed ({lines[-1] if lines else f'exit {rc}'}); log: {log}")


def parse_config(text: str) -> dict[str, str]:
    out = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    bad = set(out) - {"people", "forget", *CONFIG_KEYS}
    if bad or "people" not in out or "forget" not in out:
        raise SystemExit(f"--config {text!r}: give people=N,forget=NAME[,views=N][,identity=N]")
    return out


def config_id(c: dict[str, str]) -> str:
    return (f"p{c['people']}-{c['forget']}" + (f"-v{c['views']}" if "views" in c else "")
            + (f"-i{c['identity']}" if "identity" in c else ""))


def grid_points(grid: list[str]) -> list[list[str]]:
    """``["lr=1e-3,5e-4", "epochs=1"]`` -> every combination as lists of ``key=value``."""
    axes = []
    for g in grid:
        key, _, vals = g.partition("=")
        if not key or not vals:
            raise SystemExit(f"--grid {g!r}: give key=value1,value2,...")
        axes.append([f"{key}={v}" for v in vals.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def run_config(out: Path, c: dict[str, str], seed: int, finetune_sets: list[str], method: str | None,
               grid: list[list[str]], unlearn_sets: list[str]) -> None:
    root = out / f"{config_id(c)}-s{seed}"
    data, vanilla = root / "data", root / "vanilla"
    if not (data / "examples.jsonl").is_file():
        sets = [f"seed={seed}"] + [f"{CONFIG_KEYS[k]}={v}" for k, v in c.items() if k in CONFIG_KEYS]
        cli("make-data", "--out", str(data), "--overwrite", "--quiet", *sum((["--set", s] for s in sets), []),
            log=root / "logs" / "make-data.log")
    if not (root / "vanilla.json").is_file():
        sets = [f"seed={seed}", *finetune_sets]
        cli("finetune", "--data", str(data), "--model", "tiny", "--out", str(vanilla), "--overwrite", "--quiet",
            *sum((["--set", s] for s in sets), []), log=root / "logs" / "finetune.log")
        evaluate(data, vanilla, root / "vanilla.json", c["forget"], root / "logs" / "evaluate-vanilla.log")
    if method is None:
        return
    for point in grid:
        name = ",".join([*unlearn_sets, *point]) or "defaults"
        run = root / "runs" / method / name
        if (run / "eval.json").is_file():
            continue
        sets = [f"seed={seed}", f"forget_set={c['forget']}", *unlearn_sets, *point]
        t = time.time()
        cli("unlearn", "--data", str(data), "--model", str(vanilla), "--method", method, "--out", str(run / "model"),
            "--overwrite", "--quiet", *sum((["--set", s] for s in sets), []), log=run / "unlearn.log")
        seconds = round(time.time() - t, 1)
        evaluate(data, run / "model", run / "eval.json", c["forget"], run / "evaluate.log")
        rec = json.loads((run / "eval.json").read_text())
        rec["sweep"] = {"method": method, "point": point, "sets": sets, "unlearn_seconds": seconds}
        (run / "eval.json").write_text(json.dumps(rec, indent=1))


def evaluate(data: Path, model: Path, out: Path, forget: str, log: Path) -> None:
    sets = [f"forget_set={forget}", *EVAL_SETS]
    cli("evaluate", "--data", str(data), "--model", str(model), "--out", str(out), "--overwrite", "--quiet",
        *sum((["--set", s] for s in sets), []), log=log)


# ------------------------------------------------------------------------------------------------------ table

def collect(out: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """{configuration: {row name: {seed: results}}}; rows are "vanilla" and "<method> <grid point>"."""
    table: dict[str, dict[str, dict[int, dict]]] = {}
    for root in sorted(p for p in out.iterdir() if p.is_dir() and (p / "vanilla.json").is_file()):
        cid, _, s = root.name.rpartition("-s")
        rows = table.setdefault(cid, {})
        rows.setdefault("vanilla", {})[int(s)] = json.loads((root / "vanilla.json").read_text())
        for ev in sorted(root.glob("runs/*/*/eval.json")):
            rows.setdefault(f"{ev.parent.parent.name} {ev.parent.name}", {})[int(s)] = json.loads(ev.read_text())
    return table


def _values(runs: dict[int, dict], split: str, kind: str, metric: str) -> tuple[list[float], int | None]:
    vals, n = [], None
    for rec in runs.values():
        r = rec["results"].get(split, {}).get(kind, {})
        if isinstance(r.get(metric), (int, float)):
            vals.append(float(r[metric]))
            n = next((r[k] for k in COUNTS.get(metric, ()) if isinstance(r.get(k), int)), n)
    return vals, n


def cell(vals: list[float], n: int | None, ref: tuple[list[float], int | None] | None, digits: int = 1) -> str:
    """mean (± sd over seeds) with ``digits`` decimals; "≈" where within the noise of ``ref``'s values."""
    if not vals:
        return "–"
    m, sd = mean_sd(vals)
    text = f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(vals) > 1 else "")
    if ref is not None and ref[0] and within_noise(vals, ref[0], n, ref[1]) and vals != ref[0]:
        text = "≈ " + text
    return text


def _digits(metric: str) -> int:
    """ROUGE lies in [0, 1]; accuracies and name rates are in %."""
    return 3 if metric.startswith("gen_rouge") else 1


def bounds_cell(method: str, runs: dict[int, dict], vanilla: dict[int, dict]) -> tuple[str, list[str]]:
    if method not in BOUNDS:
        return "–", []
    met, failed = 0, []
    for seed, rec in sorted(runs.items()):
        checks = check(method, rec["results"], vanilla.get(seed, {}).get("results"))
        bad = [f"s{seed}: {c['bound']} (value {c['value']:.1f}, limit {c['limit']:.1f})" for c in checks
               if c["ok"] is False]
        missing = [c["bound"] for c in checks if c["ok"] is None]
        met += not bad and not missing
        failed += bad + [f"s{seed}: {b} not measured" for b in missing]
    return f"{met}/{len(runs)}", failed


def render(out: Path) -> str:
    table = collect(out)
    lines = ["# Sweep", "",
             "Mean ± sd over seeds (% for accuracies and name rates; ROUGE-L in [0, 1]). ≈: within the noise of "
             "vanilla's value (Welch's t-test over seeds, or a two-proportion z-test on the questions for one seed, "
             "p ≥ 0.05). bounds: seeds on which every bound of the method holds (`mmunlearn.eval.bounds`).", ""]
    summary: dict[str, list[str]] = {}
    for cid, rows in table.items():
        vanilla = rows["vanilla"]
        seeds = sorted(vanilla)
        lines += [f"## {cid} (seeds {', '.join(map(str, seeds))})", "",
                  "| model | " + " | ".join(c[3] for c in COLUMNS) + " | bounds |",
                  "|---|" + "---:|" * (len(COLUMNS) + 1)]
        notes = []
        for name, runs in rows.items():
            method = name.split(" ")[0]
            ref = None if name == "vanilla" else vanilla
            cells = [cell(*_values(runs, *c[:3]), _values(ref, *c[:3]) if ref else None, digits=_digits(c[2]))
                     for c in COLUMNS]
            b, failed = bounds_cell(method, runs, vanilla)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {b} |")
            notes += [f"- {name}: {f}" for f in failed]
            if b != "–":
                summary.setdefault(name, []).append(f"{cid}: {b}")
        lines += [""] + (["Bounds not met:", "", *notes, ""] if notes else [])
    lines += ["## Summary", "", "| model | bounds met per configuration (seeds) |", "|---|---|"]
    lines += [f"| {name} | {'; '.join(v)} |" for name, v in sorted(summary.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--config", action="append", default=[],
                    help="people=N,forget=NAME[,views=N][,identity=N] (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--method", help="a registered unlearning method")
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2 over unlearn options (repeatable)")
    ap.add_argument("--unlearn-set", action="append", default=[], help="key=value for every unlearning run")
    ap.add_argument("--finetune-set", action="append", default=[], help="key=value for the vanilla fine-tunes")
    ap.add_argument("--table", action="store_true", help="only rebuild the table from what --out holds")
    a = ap.parse_args()
    failures = []
    if not a.table:
        if not a.config:
            ap.error("give at least one --config (or --table)")
        grid = grid_points(a.grid)
        for text, seed in itertools.product(a.config, a.seeds):
            try:
                run_config(a.out, parse_config(text), seed, a.finetune_set, a.method, grid, a.unlearn_set)
            except RuntimeError as e:
                failures.append(str(e))
                print(f"sweep: {e}", file=sys.stderr)
    if not a.out.is_dir():
        raise SystemExit(f"sweep: {a.out} holds no sweep")
    text = render(a.out)
    (a.out / "sweep.md").write_text(text)
    (a.out / "sweep.json").write_text(json.dumps(
        {cid: {row: {str(s): rec["results"] for s, rec in runs.items()} for row, runs in rows.items()}
         for cid, rows in collect(a.out).items()}, indent=1))
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
