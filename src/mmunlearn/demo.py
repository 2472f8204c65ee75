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


def demo_finetune() -> FinetuneConfig:
    """The vanilla recipe capped at 4 epochs: on the default 40-person benchmark the tiny model meets the early-
    stopping target within about 4 epochs (docs/builtin.md), and the cap keeps the demo's two fine-tunes (vanilla,
    oracle) within its time budget. Larger benchmarks need more: the command's default allows 12."""
    return FinetuneConfig(epochs=4.0)


def _finetune_in_child(threads: int, data: str, model: str, out: str, cfg: FinetuneConfig) -> dict:
    import torch

    torch.set_num_threads(threads)
    return cmd.run_finetune(data, model, out, cfg, overwrite=True, progress=False)


def run_finetunes(data: str, model: str, jobs: dict[str, tuple[str, FinetuneConfig]],
                  progress: bool) -> dict[str, dict]:
    """Run the demo's fine-tunes (vanilla, oracle); returns their run records by job name.

    Two of them on a CPU run side by side, each on half the cores: the tiny model's matrices are too small for
    a second thread to speed one run up, so two runs at one thread each take about the time of one. The first
    job runs here (with its progress bar), the second in a spawned process. Elsewhere (a GPU, several
    processes, one job) they run one after the other.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from mmunlearn import distributed as D

    items = list(jobs.items())
    if len(items) != 2 or D.world() > 1 or D.device().type != "cpu" or torch.get_num_threads() < 2:
        return {name: cmd.run_finetune(data, model, out, c, overwrite=True, progress=progress)
                for name, (out, c) in items}
    threads = torch.get_num_threads()
    (first, (out1, c1)), (second, (out2, c2)) = items
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child = pool.submit(_finetune_in_child, threads // 2, data, model, out2, c2)
        torch.set_num_threads(threads - threads // 2)
        try:
            rec1 = cmd.run_finetune(data, model, out1, c1, overwrite=True, progress=progress)
        finally:
            torch.set_num_threads(threads)
        return {first: rec1, second: child.result()}


@dataclass
class DemoConfig:
    fast: bool = False  # a reduced configuration for smoke tests
    model: str = "tiny"  # tiny (built in) or smol (the real small VLM, extra "smol"; reduced benchmark)
    data: FictitiousConfig = field(default_factory=FictitiousConfig)
    finetune: FinetuneConfig = field(default_factory=demo_finetune)
    eval: EvalConfig = field(default_factory=EvalConfig)
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

            if self.data == FictitiousConfig(seed=self.data.seed):  # left at the defaults: the reduced size
                self.data = FictitiousConfig(seed=self.data.seed, **SMOL_DATA)
            if self.finetune in (FinetuneConfig(seed=self.finetune.seed),
                                 C.build(FinetuneConfig, {**C.to_dict(demo_finetune()), "seed": self.finetune.seed})):
                self.finetune = C.build(FinetuneConfig, {**finetune_preset("smol"), "seed": self.finetune.seed})
            if self.eval.forget_set == EvalConfig().forget_set:  # 2 of the 8 people
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
    from mmunlearn.train.unlearn import UnlearnConfig, run_unlearn

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data, vanilla = work / "data", work / "vanilla"
    if not (data / "examples.jsonl").is_file():
        cmd.make_data(str(data), cfg.data, overwrite=True)
    bench = Benchmark.load(data)
    timings: dict[str, float] = {}
    oracle = work / "oracle"
    jobs = {}
    if not (vanilla / cmd.RUN_FILE).is_file():
        jobs["finetune"] = (str(vanilla), cfg.finetune)
    if cfg.oracle and not (oracle / cmd.RUN_FILE).is_file():
        jobs["finetune_oracle"] = (str(oracle), C.build(FinetuneConfig, {
            **C.to_dict(cfg.finetune), "exclude_forget": cfg.eval.forget_set, "exclude_kinds": ORACLE_EXCLUDES}))
    for name, rec in run_finetunes(str(data), cfg.model, jobs, progress).items():
        timings[name] = rec["log"]["train_seconds"]
    models: dict[str, dict] = {"vanilla": {"path": str(vanilla)}}
    if cfg.oracle:
        models["oracle"] = {"path": str(oracle)}
    for method in tqdm(cfg.methods, desc="unlearn", disable=not progress):
        out = work / "unlearned" / method
        if not (out / cmd.RUN_FILE).is_file():
            ucfg = C.build(UnlearnConfig, {"method": method, "forget_set": cfg.eval.forget_set,
                                           **cfg.method_overrides.get(method, {})}, f"method_overrides.{method}")
            t = time.time()
            run_unlearn(str(data), str(vanilla), str(out), ucfg, overwrite=True, progress=False)
            timings[f"unlearn_{method}"] = round(time.time() - t, 1)
        run = read_json_object(out / cmd.RUN_FILE, what="run record")
        models[method] = {"path": str(out), "history": run.get("history", [])}
    ecfg = C.build(EvalConfig, {**C.to_dict(cfg.eval), "reference": str(vanilla)})
    for name, m in tqdm(models.items(), desc="evaluate", disable=not progress):
        t = time.time()
        res = cmd.run_evaluate(str(data), m["path"], ecfg, progress=False)
        m["results"], m["mode"] = res["results"], res["mode"]
        timings[f"evaluate_{name}"] = round(time.time() - t, 1)
    if cfg.oracle:
        vcfg = C.build(VerifyConfig, {**C.to_dict(cfg.verify), "forget_set": cfg.eval.forget_set})
        measured: dict[str, dict] = {}  # vanilla and the oracle are measured once
        for name, m in tqdm(models.items(), desc="verify", disable=not progress):
            t = time.time()
            res = cmd.run_verify(m["path"], str(data), str(vanilla), str(oracle), vcfg, measured=measured)
            m["verification"] = {k: res[k] for k in ("verdict", "summary", "checks")}
            m["verification"]["file"] = res["files"]["json"]
            timings[f"verify_{name}"] = round(time.time() - t, 1)
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
