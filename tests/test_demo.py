"""The demo's jobs side by side on a CPU: two fine-tunes (vanilla, oracle), then jobs in the worker pool."""

import torch

from mmunlearn.commands import RUN_FILE
from mmunlearn.demo import Workers, _evaluate_job, _finetune_job
from mmunlearn.eval.runner import EvalConfig
from mmunlearn.outputs import read_json_object
from mmunlearn.train.finetune import FinetuneConfig

EVAL = dict(forget_set="forget15", splits=["forget"], protocols=[], cache=False)


def test_jobs_run_side_by_side_and_the_threads_are_restored(small_bench, tmp_path):
    cfg = dict(steps=3, vision_warmup_steps=0, stop_accuracy=0.0, save_every=0)
    jobs = {"finetune": (str(tmp_path / "vanilla"), FinetuneConfig(**cfg)),
            "finetune_oracle": (str(tmp_path / "oracle"),
                                FinetuneConfig(**cfg, exclude_forget="forget15", exclude_kinds=("vqa",)))}
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the side-by-side path needs two threads to share out
    (vout, vcfg), (oout, ocfg) = jobs.values()
    try:
        with Workers() as workers:
            assert workers.pool is not None
            oracle = workers.submit(_finetune_job, str(small_bench.root), "tiny", oout, ocfg, "auto")
            recs = {"finetune": workers.here(_finetune_job, str(small_bench.root), "tiny", vout, vcfg, "auto"),
                    "finetune_oracle": oracle.result()}
            assert torch.get_num_threads() == 2
            ev = {n: workers.submit(_evaluate_job, str(small_bench.root), out, EvalConfig(**EVAL), "auto")
                  for n, (out, _) in jobs.items()}
            ev = {n: f.result() for n, f in ev.items()}
    finally:
        torch.set_num_threads(before)
    assert set(recs) == set(jobs)
    assert recs["finetune"]["log"]["threads"] == 1 and recs["finetune_oracle"]["log"]["threads"] == 1
    assert recs["finetune"]["log"]["excluded_entities"] == []
    assert recs["finetune_oracle"]["log"]["excluded_entities"] == sorted(small_bench.forget_set("forget15"))
    for name in jobs:
        assert 0 <= ev[name]["results"]["forget"]["vqa"]["mc_acc"] <= 100
    for out, _ in jobs.values():  # each written to its own directory, in full
        assert read_json_object(f"{out}/{RUN_FILE}", what="run record")["log"]["steps"] == 3


def test_demo_options_merge_into_the_demos_benchmark_size():
    """``--set data.seed=3`` changes the seed only: the demo keeps its 20 people and forget20 (4 people)."""
    from mmunlearn import config as C
    from mmunlearn.demo import DEMO_FORGET, DemoConfig, defaults

    cfg = C.load(DemoConfig, None, ["data.seed=3"], base={"model": "tiny", **defaults()})
    assert (cfg.data.seed, cfg.data.num_people, cfg.eval.forget_set) == (3, 20, DEMO_FORGET)
    assert cfg.finetune.stop_accuracy > 0  # sized by early stopping, not a fixed cap
    smol = C.load(DemoConfig, None, [], base={"model": "smol", **defaults()})
    assert (smol.data.num_people, smol.eval.forget_set) == (8, "forget15")
    assert smol.data.describe and smol.eval.max_new_tokens == 40  # free-form answers, generated in full
    assert not cfg.data.describe and cfg.eval.max_new_tokens == 24
    explicit = C.load(DemoConfig, None, ["data.num_people=40", "eval.forget_set=forget10"], base=defaults())
    assert (explicit.data.num_people, explicit.eval.forget_set) == (40, "forget10")


def test_the_fast_demo_runs_every_stage_through_the_pool(tmp_path):
    """The whole pipeline on the reduced configuration, with two threads so that the jobs go through the pool:
    every model is evaluated and verified, the report is written, and a second call reuses everything. In
    bfloat16, so that the demo's dtype is seen to reach every stage (the CPU keeps fp32 master weights)."""
    from mmunlearn.demo import DemoConfig, run_demo

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = DemoConfig(fast=True, methods=("ga", "mmunlearner"), dtype="bfloat16")
        cfg.finetune.steps, cfg.finetune.vision_warmup_steps = 20, 10
        report = run_demo(tmp_path, cfg, progress=False)
        res = read_json_object(tmp_path / "results.json", what="results")
        again = run_demo(tmp_path, cfg, progress=False)
    finally:
        torch.set_num_threads(before)
    assert report.is_file() and again == report
    assert list(res["models"]) == ["vanilla", "oracle", "ga", "mmunlearner"]
    for name, m in res["models"].items():
        assert "forget" in m["results"] and m["verification"]["verdict"], name
        assert read_json_object(f"{m['path']}/{RUN_FILE}", what="run record")["dtype"] == "bfloat16", name
    for key in ("finetune", "finetune_oracle", "unlearn_ga", "unlearn_mmunlearner", "verify_oracle"):
        assert key in res["timings_seconds"]
    assert "finetune" not in read_json_object(tmp_path / "results.json", what="results")["timings_seconds"]


def test_a_thread_scaling_model_trains_the_vanilla_on_every_thread_first(tmp_path, monkeypatch):
    """Where a model's step scales with threads (smol), the vanilla model trains alone on both threads and the
    oracle follows in the pool; every job still runs once and the longest unlearning runs are queued first."""
    from mmunlearn import demo
    from mmunlearn.demo import DemoConfig, run_demo

    monkeypatch.setitem(demo.THREAD_SCALING, "tiny", True)
    assert sorted(["ga", "siu", "npo", "mmunlearner"], key=demo._longest_first) == ["mmunlearner", "siu", "ga", "npo"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = DemoConfig(fast=True, methods=("ga",))
        cfg.finetune.steps, cfg.finetune.vision_warmup_steps = 10, 5
        run_demo(tmp_path, cfg, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    res = read_json_object(tmp_path / "results.json", what="results")
    assert list(res["models"]) == ["vanilla", "oracle", "ga"]
    threads = {n: read_json_object(tmp_path / n / RUN_FILE, what="run record")["log"]["threads"]
               for n in ("vanilla", "oracle")}
    assert threads == {"vanilla": 2, "oracle": 1}
    for name, m in res["models"].items():
        assert "forget" in m["results"] and m["verification"]["verdict"], name
    assert {"finetune", "finetune_oracle", "unlearn_ga", "verify_ga", "evaluate_oracle"} <= set(res["timings_seconds"])


STOPPED_DEMO = """
import multiprocessing, time, torch
from mmunlearn.demo import Workers
torch.set_num_threads(2)
with Workers() as workers:
    assert workers.pool is not None
    jobs = [workers.submit(time.sleep, 120) for _ in range(2)]
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.1)
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    jobs[0].result()
"""


def test_sigterm_stops_the_demos_workers_with_it():
    """A stopped demo takes its pool with it: no worker runs on, orphaned, after the demo has exited."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", STOPPED_DEMO], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1)  # the jobs are running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    deadline = time.time() + 10
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in pids if _running(p)]
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived the demo"


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, exited but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
