"""``mmunlearn demo``: make-data -> fine-tune (reused when present) -> evaluate -> report, on the built-in
benchmark with the tiny model, fully offline.

Writes ``<workdir>/report.md`` (for people) and ``<workdir>/results.json`` (for programs; layout in
docs/results.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mmunlearn import commands as cmd
from mmunlearn import config as C
from mmunlearn.data.fictitious import FictitiousConfig
from mmunlearn.data.schema import Benchmark
from mmunlearn.eval.runner import EvalConfig
from mmunlearn.outputs import write_json
from mmunlearn.train.finetune import FinetuneConfig

RESULTS_VERSION = 1


@dataclass
class DemoConfig:
    fast: bool = False  # a reduced configuration for smoke tests
    data: FictitiousConfig = field(default_factory=FictitiousConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.fast:
            self.data = FictitiousConfig(seed=self.data.seed, num_people=8, train_images=2, test_images=1)
            self.finetune.steps = min(self.finetune.steps, 150)
            self.finetune.vision_warmup_steps = min(self.finetune.vision_warmup_steps, 100)
            self.eval.forget_set = "forget15"


def run_demo(workdir: str | Path, cfg: DemoConfig, progress: bool = True) -> Path:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data, vanilla = work / "data", work / "vanilla"
    if not (data / "examples.jsonl").is_file():
        cmd.make_data(str(data), cfg.data, overwrite=True)
    bench = Benchmark.load(data)
    timings: dict[str, float] = {}
    if not (vanilla / cmd.RUN_FILE).is_file():
        rec = cmd.run_finetune(str(data), "tiny", str(vanilla), cfg.finetune, overwrite=True, progress=progress)
        timings["finetune"] = rec["log"]["train_seconds"]
    rows = {"vanilla": cmd.run_evaluate(str(data), str(vanilla), cfg.eval, progress=progress)}
    timings["total"] = round(time.time() - t0, 1)
    results = {
        "version": RESULTS_VERSION,
        "benchmark": {"name": bench.name, "path": str(data.resolve()), "forget_set": cfg.eval.forget_set,
                      "forget_entities": sorted(bench.forget_set(cfg.eval.forget_set))},
        "config": C.to_dict(cfg),
        "models": {name: {"path": r["model"], "results": r["results"]} for name, r in rows.items()},
        "timings_seconds": timings,
    }
    write_json(work / "results.json", results)
    report = work / "report.md"
    report.write_text(demo_report(results))
    return report


def demo_report(results: dict) -> str:
    b = results["benchmark"]
    lines = [
        "# mmunlearn demo report",
        "",
        f"Benchmark `{b['name']}`, forget set `{b['forget_set']}` ({len(b['forget_entities'])} entities). "
        "Multiple-choice accuracy in % (4 options, chance 25 %); `name_rate` = % of identity answers that name "
        "the person (lower = more forgotten); ROUGE-L F1 of text-only biographies.",
        "",
        cmd.results_markdown(results["models"]),
        "## Example generations",
        "",
    ]
    for name, r in results["models"].items():
        for split in ("forget", "test"):
            for s in r["results"].get(split, {}).get("vqa", {}).get("samples", [])[:2]:
                lines.append(f"- **{name}**, {split}, `{s['image']}` — {s['prompt']} → “{s['output']}” "
                             f"(truth: {s['answer']})")
    lines += ["", f"Timings (s): {results['timings_seconds']}", ""]
    return "\n".join(lines)
