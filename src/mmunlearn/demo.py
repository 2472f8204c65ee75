"""``mmunlearn demo``: make-data -> fine-tune (vanilla, and the oracle without the forget data) -> unlearn with
every method -> evaluate -> verify (forget quality, relearning and quantization attacks, MIA, probes) -> report, on
the built-in benchmark with the tiny model, fully offline.

Data, the vanilla model and each unlearned model are reused when already there (delete ``<workdir>`` to start
over). Writes ``<workdir>/report.md`` and ``report.html`` (for people, with plots) and
``<workdir>/results.json`` (for programs; layout in docs/results.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmunlearn import commands as cmd
from mmunlearn import config as C
from mmunlearn.data.fictitious import FictitiousConfig
from mmunlearn.data.schema import Benchmark
from mmunlearn.errors import ConfigError
from mmunlearn.eval.runner import EvalConfig
from mmunlearn.outputs import read_json_object, write_json
from mmunlearn.train.finetune import FinetuneConfig
from mmunlearn.verify.attacks import RelearnSetting
from mmunlearn.verify.options import VerifyConfig

RESULTS_VERSION = 1


def _all_methods() -> tuple[str, ...]:
    from mmunlearn.methods import METHODS

    return tuple(METHODS.names())


# The demo unlearns the forget entities' image questions (entity visual unlearning); the oracle is the vanilla
# recipe trained without exactly those examples, so it still knows the entities' text-only facts.
ORACLE_EXCLUDES = ("vqa",)


def demo_verify() -> VerifyConfig:
    """Verification with relearning settings scaled to the tiny model.

    The standard settings (LoRA r=8 lr 1e-4, full lr 2e-5: about 2x a 7B model's unlearning learning rate) move a
    4M-parameter model trained at lr 1e-3 hardly at all in the ~10 steps of one epoch; the tiny model's analogue
    is about 2x the demo methods' unlearning rates (1e-4 to 5e-4): full-parameter at lr 5e-4 (LoRA r=8 at lr 2e-3 is
    the matching LoRA attack, left out to keep the demo short). Membership inference scores 64 of the forget set's
    training answers (evenly spread), for the same reason.
    """
    return VerifyConfig(relearn=[RelearnSetting("full", lr=5e-4)], mia_limit=64)


# The built-in benchmark at the size the smol model trains on within about half an hour of 2 CPU cores
# (docs/smol.md): 8 people, 2 training views and 1 held-out view each.
SMOL_DATA = {"num_people": 8, "train_images": 2, "test_images": 1}
MODELS = ("tiny", "smol")


# The built-in benchmark at the demo's size: 20 people, of whom forget20 (4) are forgotten, so the forget split
# holds as many questions as forget10 of the 40-person default (144 VQA, 60 QA: one question is 0.7 or 1.7 points)
# while the two fine-tunes need about half the steps each (docs/builtin.md).
DEMO_DATA = {"num_people": 20, "forget_percents": (5, 10, 15, 20)}
DEMO_FORGET = "forget20"


def demo_data() -> FictitiousConfig:
    return FictitiousConfig(**DEMO_DATA)


def demo_eval() -> EvalConfig:
    return EvalConfig(forget_set=DEMO_FORGET)


def defaults() -> dict:
    """The demo's benchmark size and forget set as options, under which a file or ``--set`` options merge (so
    ``--set data.seed=3`` keeps the demo's 20 people)."""
    return {"data": C.to_dict(demo_data()), "eval": {"forget_set": DEMO_FORGET}}

def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class Workers:
    """Where the demo's independent jobs run: on a CPU with n >= 2 threads, two spawned processes of n // 2
    threads each (the tiny model's matrices are too small for a second thread to speed one job up, so two jobs
    at one thread each take about the time of one); elsewhere (a GPU, several processes, one thread) here, one
    after the other. Jobs are module-level functions of picklable arguments."""

    def __init__(self) -> None:
        import torch

        from mmunlearn import distributed as D

        self.threads = torch.get_num_threads()
        self.pool = None
        if D.world() == 1 and D.device().type == "cpu" and self.threads >= 2:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_threads, initargs=(self.threads // 2,))

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, fn, jobs: dict[str, tuple], desc: str, progress: bool) -> dict[str, Any]:
        """``{name: fn(*args)}`` for ``jobs = {name: args}``; the first failure is raised."""
        bar = tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs)
        out = {}
        with bar:
            if self.pool is None:
                for name, args in jobs.items():
                    out[name] = fn(*args)
                    bar.update()
                return out
            from concurrent.futures import as_completed

            futures = {self.pool.submit(fn, *args): name for name, args in jobs.items()}
            for f in as_completed(futures):
                out[futures[f]] = f.result()
                bar.update()
        return {name: out[name] for name in jobs}

    def finetunes(self, data: str, model: str, jobs: dict[str, tuple[str, FinetuneConfig]],
                  progress: bool) -> dict[str, dict]:
        """The fine-tunes' run records by job name. With the pool, the first job runs here (with its progress
        bar) on the other half of the threads while the others run in the pool."""
        items = list(jobs.items())
        if self.pool is None or len(items) < 2:
            return {name: cmd.run_finetune(data, model, out, c, overwrite=True, progress=progress)
                    for name, (out, c) in items}
        import torch

        (first, (out1, c1)), rest = items[0], items[1:]
        futures = {name: self.pool.submit(_finetune_job, data, model, out, c) for name, (out, c) in rest}
        torch.set_num_threads(self.threads - self.threads // 2)
        try:
            recs = {first: cmd.run_finetune(data, model, out1, c1, overwrite=True, progress=progress)}
        finally:
            torch.set_num_threads(self.threads)
        return recs | {name: f.result() for name, f in futures.items()}


# ---- the demo's jobs (module-level, so that a spawned worker can run them) ------------------------------------

def _finetune_job(data: str, model: str, out: str, cfg: FinetuneConfig) -> dict:
    return cmd.run_finetune(data, model, out, cfg, overwrite=True, progress=False)


def _unlearn_job(data: str, vanilla: str, out: str, cfg: Any) -> float:
    from mmunlearn.train.unlearn import run_unlearn

    t = time.time()
    run_unlearn(data, vanilla, out, cfg, overwrite=True, progress=False)
    return round(time.time() - t, 1)


def _evaluate_job(data: str, model: str, cfg: EvalConfig) -> dict:
    t = time.time()
    res = cmd.run_evaluate(data, model, cfg, progress=False)
    return {"results": res["results"], "mode": res["mode"], "seconds": round(time.time() - t, 1)}


def _measure_job(model: str, data: str, cfg: VerifyConfig) -> dict:
    from mmunlearn.verify.measure import measure

    bench = Benchmark.load(data)
    return measure(cmd.open_model(model, bench), bench, cmd.verify_forget_entities(bench, model, cfg), cfg)


def _verify_job(model: str, data: str, vanilla: str, oracle: str, cfg: VerifyConfig,
                measured: dict[str, dict]) -> tuple[dict, float]:
    t = time.time()
    res = cmd.run_verify(model, data, vanilla, oracle, cfg, measured=dict(measured))
    return {k: res[k] for k in ("verdict", "summary", "checks")} | {"file": res["files"]["json"]}, round(
        time.time() - t, 1)


@dataclass
class DemoConfig:
    fast: bool = False  # a reduced configuration for smoke tests
    model: str = "tiny"  # tiny (built in) or smol (the real small VLM, extra "smol"; reduced benchmark)
    data: FictitiousConfig = field(default_factory=demo_data)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=demo_eval)
    methods: tuple[str, ...] = field(default_factory=_all_methods)
    method_overrides: dict[str, dict] = field(default_factory=dict)  # method -> UnlearnConfig fields
    oracle: bool = True  # train the oracle and verify every model against it
    verify: VerifyConfig = field(default_factory=demo_verify)

    def __post_init__(self) -> None:
        from mmunlearn.methods import METHODS

        for m in self.methods:
            METHODS.get(m)  # unknown names fail here, with a suggestion
        if self.model not in MODELS:
            raise ConfigError(f"demo model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.model == "smol":
            from mmunlearn.train.recipes import finetune_preset

            if self.data == FictitiousConfig(seed=self.data.seed, **DEMO_DATA):  # left at the demo's: smol's
                self.data = FictitiousConfig(seed=self.data.seed, **SMOL_DATA)
            if self.finetune == FinetuneConfig(seed=self.finetune.seed):
                self.finetune = C.build(FinetuneConfig, {**finetune_preset("smol"), "seed": self.finetune.seed})
            if self.eval.forget_set == DEMO_FORGET:  # 2 of the 8 people
                self.eval.forget_set = "forget15"
            if self.verify == demo_verify():  # a pretrained model: the standard full-parameter attack
                self.verify = VerifyConfig(relearn=[RelearnSetting("full", lr=2e-5)], mia_limit=64)
        if self.fast:
            self.data = FictitiousConfig(seed=self.data.seed, num_people=8, train_images=2, test_images=1)
            self.finetune.steps = min(self.finetune.steps or 150, 150)
            self.finetune.vision_warmup_steps = min(self.finetune.vision_warmup_steps, 100)
            self.eval.forget_set = "forget15"


def run_demo(workdir: str | Path, cfg: DemoConfig, progress: bool = True) -> Path:
    from mmunlearn.report import write_report
    from mmunlearn.train.unlearn import UnlearnConfig

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data, vanilla = work / "data", work / "vanilla"
    if not (data / "examples.jsonl").is_file():
        cmd.make_data(str(data), cfg.data, overwrite=True)
    bench = Benchmark.load(data)
    timings: dict[str, float] = {}
    oracle = work / "oracle"
    d, v = str(data), str(vanilla)
    with Workers() as workers:
        jobs = {}
        if not (vanilla / cmd.RUN_FILE).is_file():
            jobs["finetune"] = (v, cfg.finetune)
        if cfg.oracle and not (oracle / cmd.RUN_FILE).is_file():
            jobs["finetune_oracle"] = (str(oracle), C.build(FinetuneConfig, {
                **C.to_dict(cfg.finetune), "exclude_forget": cfg.eval.forget_set, "exclude_kinds": ORACLE_EXCLUDES}))
        for name, rec in workers.finetunes(d, cfg.model, jobs, progress).items():
            timings[name] = rec["log"]["train_seconds"]
        models: dict[str, dict] = {"vanilla": {"path": v}}
        if cfg.oracle:
            models["oracle"] = {"path": str(oracle)}
        unlearn = {}
        for method in cfg.methods:
            out = work / "unlearned" / method
            models[method] = {"path": str(out)}
            if not (out / cmd.RUN_FILE).is_file():
                unlearn[f"unlearn_{method}"] = (d, v, str(out), C.build(UnlearnConfig, {
                    "method": method, "forget_set": cfg.eval.forget_set, **cfg.method_overrides.get(method, {})},
                    f"method_overrides.{method}"))
        timings.update(workers.map(_unlearn_job, unlearn, "unlearn", progress))
        for method in cfg.methods:
            run = read_json_object(work / "unlearned" / method / cmd.RUN_FILE, what="run record")
            models[method]["history"] = run.get("history", [])
        ecfg = C.build(EvalConfig, {**C.to_dict(cfg.eval), "reference": v})
        evaluated = workers.map(_evaluate_job, {name: (d, m["path"], ecfg) for name, m in models.items()},
                                "evaluate", progress)
        for name, res in evaluated.items():
            models[name].update(results=res["results"], mode=res["mode"])
            timings[f"evaluate_{name}"] = res["seconds"]
        if cfg.oracle:
            vcfg = C.build(VerifyConfig, {**C.to_dict(cfg.verify), "forget_set": cfg.eval.forget_set})
            # vanilla and the oracle are measured once, side by side, for every model's comparison
            measured = workers.map(_measure_job, {p: (p, d, vcfg) for p in (v, str(oracle))}, "measure", progress)
            done = workers.map(_verify_job, {name: (m["path"], d, v, str(oracle), vcfg, measured)
                                             for name, m in models.items()}, "verify", progress)
            for name, (res, seconds) in done.items():
                models[name]["verification"] = res
                timings[f"verify_{name}"] = seconds
    timings["total"] = round(time.time() - t0, 1)
    results = {
        "version": RESULTS_VERSION,
        "benchmark": {"name": bench.name, "path": str(data.resolve()), "forget_set": cfg.eval.forget_set,
                      "forget_entities": sorted(bench.forget_set(cfg.eval.forget_set))},
        "config": C.to_dict(cfg),
        "models": models,
        "timings_seconds": timings,
    }
    write_json(work / "results.json", results)
    title = f"mmunlearn demo: fictitious-people with the {cfg.model} model"
    return write_report(results, work, title=title)["markdown"]
