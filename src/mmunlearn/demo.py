"""``mmunlearn demo``: make-data -> fine-tune (vanilla, and the oracle without the forget data) -> unlearn with
every method -> evaluate -> verify (forget quality, relearning and quantization attacks, MIA, probes) -> report, on
the built-in benchmark with the tiny model, fully offline.

Data, the vanilla model and each unlearned model are reused when already there (delete ``<workdir>`` to start
over). Writes ``<workdir>/report.md`` and ``report.html`` (for people, with plots) and
``<workdir>/results.json`` (for programs; layout in docs/results.md).
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
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
from mmunlearn.models import DTYPES, cpu_has_bf16
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
    4M-parameter model trained at lr 5e-4 hardly at all in the ~10 steps of one epoch; the tiny model's analogue
    is about 2x the demo methods' unlearning rates (1e-4 to 5e-4): full-parameter at lr 5e-4 (LoRA r=8 at lr 2e-3 is
    the matching LoRA attack, left out to keep the demo short). Membership inference scores 64 of the forget set's
    training answers (evenly spread), for the same reason.
    """
    return VerifyConfig(relearn=[RelearnSetting("full", lr=5e-4)], mia_limit=64)


# The built-in benchmark at the size the smol model trains on within about half an hour of 2 CPU cores
# (docs/smol.md): 8 people, 2 training views and 1 held-out view each, each view also described in a sentence
# (free-form answers, where a pretrained language model's fluency and diversity can be measured).
SMOL_DATA = {"num_people": 8, "train_images": 2, "test_images": 1, "describe": True}
# generated tokens per answer: a description takes up to 33 of SmolLM2's tokens, end of turn included
SMOL_NEW_TOKENS = 40
MODELS = ("tiny", "smol")


def smol_method_overrides() -> dict[str, dict]:
    """The paper recipes, except MMUnlearner's: the tiny model's structure (the saliency mask and training on the
    vision tower and projector only, retain steps on retain VQA) with a forget step at every iteration, lr 3e-4,
    4 epochs. The paper's recipe (a language mask too, lr 1e-5, one epoch with a forget step every third
    iteration) left forget VQA at 92 %, and every length of it that reached forget VQA <= 35 % took the forgotten
    people's text-only facts with it on one vanilla model or another (forget QA 50-87 % of vanilla); with the
    language model untouched they stay at 100 %. Three epochs left seed 1's forget VQA at 37.5 % (docs/smol.md)."""
    return {"mmunlearner": {"lr": 3e-4, "epochs": 4.0, "trainable": ["vision", "projector"], "retain_kinds": ["vqa"],
                            "method_options": {"groups": ["vision"], "interval": 1}}}


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

# Whether a model's training step runs faster on more threads. The smol model's does (its demo, seed 0: the
# vanilla fine-tune took 1.2 s a step on 2 threads, the oracle 2.3 s on one, alignment and stop checks included;
# docs/smol.md), so its vanilla model trains on every thread before anything else; the tiny model's matrices are
# too small for that, so its oracle trains beside it, one thread each.
THREAD_SCALING = {"tiny": False, "smol": True}
# Unlearning runs that take longest, in that order, started first so that the short ones fill the other worker
# (tiny demo: MMUnlearner 60 s and SIU 29 s against at most 2.2 s for the others; smol, seed 1: MMUnlearner
# 206 s, SIU 69 s, the others 22-41 s)
LONGEST_FIRST = ("mmunlearner", "siu")


def _longest_first(method: str) -> int:
    return LONGEST_FIRST.index(method) if method in LONGEST_FIRST else len(LONGEST_FIRST)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class Workers:
    """Where the demo's jobs run: on a CPU with n >= 2 threads, two spawned processes of n // 2 threads each (the
    tiny model's matrices are too small for a second thread to speed one job up, so two jobs at one thread each
    take about the time of one); elsewhere (a GPU, several processes, one thread) here, one after the other, each
    as it is submitted. Jobs are module-level functions of picklable arguments."""

    def __init__(self) -> None:
        import torch

        from mmunlearn import distributed as D

        self.threads = torch.get_num_threads()
        self.pool = None
        if D.world() == 1 and D.device().type == "cpu" and self.threads >= 2:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_threads, initargs=(self.threads // 2,))

    def __enter__(self) -> Workers:
        # SIGTERM (a scheduler's stop, ``kill``) unwinds through ``__exit__`` like Ctrl-C, so that the workers stop
        # with the demo instead of running on, orphaned, until their current job ends
        self._sigterm = None
        if self.pool is not None and threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.pool is None:
            return
        if exc_type is None:
            self.pool.shutdown(cancel_futures=True)
        else:  # stopped or failed: the jobs still running are not wanted, so they stop now (SIGTERM first, so
            # that a fine-tune among them saves its checkpoint for --resume; SIGKILL for what is left after 10 s)
            running = multiprocessing.active_children()
            self.pool.shutdown(wait=False, cancel_futures=True)
            for p in running:
                p.terminate()
            for p in running:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)

    def submit(self, fn, *args) -> Future:
        """``fn(*args)`` in the pool (queued in submission order), or here and now."""
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def here(self, fn, *args, all_threads: bool = False, **kwargs):
        """``fn(*args, **kwargs)`` in this process: on the threads the pool leaves free, or (``all_threads``,
        while the pool has nothing to do) on all of them."""
        import torch

        if self.pool is None or all_threads:
            return fn(*args, **kwargs)
        torch.set_num_threads(self.threads - self.threads // 2)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(self.threads)


# ---- the demo's jobs (module-level, so that a spawned worker can run them) ------------------------------------

def _finetune_job(data: str, model: str, out: str, cfg: FinetuneConfig, dtype: str) -> dict:
    return cmd.run_finetune(data, model, out, cfg, overwrite=True, progress=False, dtype=dtype)


def _unlearn_job(data: str, vanilla: str, out: str, cfg: Any, dtype: str) -> float:
    from mmunlearn.train.unlearn import run_unlearn

    t = time.time()
    run_unlearn(data, vanilla, out, cfg, overwrite=True, progress=False, dtype=dtype)
    return round(time.time() - t, 1)


def _evaluate_job(data: str, model: str, cfg: EvalConfig, dtype: str) -> dict:
    t = time.time()
    res = cmd.run_evaluate(data, model, cfg, progress=False, dtype=dtype)
    return {"results": res["results"], "mode": res["mode"], "seconds": round(time.time() - t, 1)}


def _measure_job(model: str, data: str, cfg: VerifyConfig, dtype: str) -> dict:
    from mmunlearn.verify.measure import measure

    bench = Benchmark.load(data)
    return measure(cmd.open_model(model, bench, dtype=dtype), bench, cmd.verify_forget_entities(bench, model, cfg), cfg)


def _verify_job(model: str, data: str, vanilla: str, oracle: str, cfg: VerifyConfig,
                measured: dict[str, dict], dtype: str) -> tuple[dict, float]:
    t = time.time()
    res = cmd.run_verify(model, data, vanilla, oracle, cfg, measured=dict(measured), dtype=dtype)
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
    # the weights' dtype of every stage (``--dtype`` of the commands); auto: bfloat16 on CUDA, float32 on the
    # CPU, except the smol model on a CPU with bfloat16 instructions: bfloat16 there (fp32 master weights in
    # training, as on a GPU; a training step takes 0.58 of its float32 time, docs/smol.md)
    dtype: str = "auto"

    def __post_init__(self) -> None:
        from mmunlearn.methods import METHODS

        for m in self.methods:
            METHODS.get(m)  # unknown names fail here, with a suggestion
        if self.model not in MODELS:
            raise ConfigError(f"demo model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"demo dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.model == "smol":
            from mmunlearn.train.recipes import finetune_preset

            if self.data == FictitiousConfig(seed=self.data.seed, **DEMO_DATA):  # left at the demo's: smol's
                self.data = FictitiousConfig(seed=self.data.seed, **SMOL_DATA)
            if self.finetune == FinetuneConfig(seed=self.finetune.seed):
                self.finetune = C.build(FinetuneConfig, {**finetune_preset("smol"), "seed": self.finetune.seed})
            if self.eval.forget_set == DEMO_FORGET:  # 2 of the 8 people
                self.eval.forget_set = "forget15"
            if self.eval.max_new_tokens == EvalConfig().max_new_tokens:
                self.eval.max_new_tokens = SMOL_NEW_TOKENS
            if self.verify == demo_verify():  # a pretrained model: the standard full-parameter attack
                self.verify = VerifyConfig(relearn=[RelearnSetting("full", lr=2e-5)], mia_limit=64)
            asked = self.method_overrides  # wins over the sizing, field by field
            self.method_overrides = {**asked, **{m: {**opts, **asked.get(m, {})}
                                                 for m, opts in smol_method_overrides().items()}}
            if self.dtype == "auto" and cpu_has_bf16():
                self.dtype = "bfloat16"
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
    models: dict[str, dict] = {"vanilla": {"path": v}}
    if cfg.oracle:
        models["oracle"] = {"path": str(oracle)}
    methods = {m: work / "unlearned" / m for m in cfg.methods}
    models |= {m: {"path": str(out)} for m, out in methods.items()}
    ecfg = C.build(EvalConfig, {**C.to_dict(cfg.eval), "reference": v})
    vcfg = C.build(VerifyConfig, {**C.to_dict(cfg.verify), "forget_set": cfg.eval.forget_set})
    todo = [m for m, out in methods.items() if not (out / cmd.RUN_FILE).is_file()]
    bar = tqdm(total=len(todo) + len(models) + (len(models) + 2) * cfg.oracle, desc="unlearn, evaluate, verify",
               disable=not progress)

    # Jobs start as soon as what they need is there: unlearning and evaluations once the vanilla model is,
    # the oracle's evaluation and the two reference measurements once the oracle is, every model's verification
    # once those measurements and the model are. Where the model's training step scales with threads (smol) the
    # vanilla model trains on all of them first; elsewhere (tiny) the oracle trains in the pool beside it.
    oracle_cfg = C.build(FinetuneConfig, {**C.to_dict(cfg.finetune), "exclude_forget": cfg.eval.forget_set,
                                          "exclude_kinds": ORACLE_EXCLUDES})
    beside = not THREAD_SCALING[cfg.model]
    unlearn_cfg = {m: C.build(UnlearnConfig, {"method": m, "forget_set": cfg.eval.forget_set,
                                              **cfg.method_overrides.get(m, {})}, f"method_overrides.{m}")
                   for m in todo}
    with Workers() as workers, bar:
        jobs: dict[Future, tuple[str, str]] = {}
        ready: set[str] = set()  # the models that exist, once their evaluation is submitted
        measured: dict[str, dict] = {}

        def submit(kind: str, name: str, fn, *args) -> None:
            jobs[workers.submit(fn, *args)] = (kind, name)

        def verify(name: str) -> None:
            submit("verify", name, _verify_job, models[name]["path"], d, v, str(oracle), vcfg, measured, cfg.dtype)

        def on_model(name: str) -> None:  # a model exists: evaluate it, and verify it once the references are in
            ready.add(name)
            submit("evaluate", name, _evaluate_job, d, models[name]["path"], ecfg, cfg.dtype)
            if len(measured) == 2:
                verify(name)

        def on_oracle() -> None:
            on_model("oracle")
            for p in (v, str(oracle)):  # vanilla and the oracle are measured once, for every model's comparison
                submit("measure", p, _measure_job, p, d, vcfg, cfg.dtype)

        def train_oracle() -> None:
            submit("oracle", "oracle", _finetune_job, d, cfg.model, str(oracle), oracle_cfg, cfg.dtype)

        oracle_todo = cfg.oracle and not (oracle / cmd.RUN_FILE).is_file()
        if oracle_todo and beside:
            train_oracle()
        if not (vanilla / cmd.RUN_FILE).is_file():
            rec = workers.here(cmd.run_finetune, d, cfg.model, v, cfg.finetune, overwrite=True, progress=progress,
                               dtype=cfg.dtype, all_threads=not beside)
            timings["finetune"] = rec["log"]["train_seconds"]
        for i, m in enumerate(sorted(todo, key=_longest_first)):  # the longest jobs first
            submit("unlearn", m, _unlearn_job, d, v, str(methods[m]), unlearn_cfg[m], cfg.dtype)
            if i == 0 and oracle_todo and not beside:  # beside the longest one
                train_oracle()
        if oracle_todo and not beside and not todo:
            train_oracle()
        for name in ["vanilla"] + [m for m in methods if m not in todo]:
            on_model(name)
        if cfg.oracle and not oracle_todo:
            on_oracle()
        while jobs:
            for f in wait(jobs, return_when=FIRST_COMPLETED).done:
                kind, name = jobs.pop(f)
                out = f.result()
                if kind == "oracle":
                    timings["finetune_oracle"] = out["log"]["train_seconds"]
                    on_oracle()
                    continue
                bar.update()
                if kind == "unlearn":
                    timings[f"unlearn_{name}"] = out
                    on_model(name)
                elif kind == "evaluate":
                    models[name].update(results=out["results"], mode=out["mode"])
                    timings[f"evaluate_{name}"] = out["seconds"]
                elif kind == "measure":
                    measured[name] = out
                    if len(measured) == 2:
                        for m in sorted(ready, key=list(models).index):
                            verify(m)
                else:
                    models[name]["verification"], timings[f"verify_{name}"] = out
        for m in methods:
            models[m]["history"] = read_json_object(methods[m] / cmd.RUN_FILE, what="run record").get("history", [])
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
