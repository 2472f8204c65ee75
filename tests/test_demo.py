"""The demo's jobs side by side on a CPU: two fine-tunes (vanilla, oracle), then jobs in the worker pool."""

import torch

from mmunlearn.commands import RUN_FILE
from mmunlearn.demo import Workers, _evaluate_job
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
    try:
        with Workers() as workers:
            assert workers.pool is not None
            recs = workers.finetunes(str(small_bench.root), "tiny", jobs, progress=False)
            assert torch.get_num_threads() == 2
            # jobs in the pool come back by name, in the order given
            ev = workers.map(_evaluate_job, {n: (str(small_bench.root), out, EvalConfig(**EVAL))
                                              for n, (out, _) in jobs.items()}, "evaluate", progress=False)
    finally:
        torch.set_num_threads(before)
    assert set(recs) == set(jobs)
    assert recs["finetune"]["log"]["threads"] == 1 and recs["finetune_oracle"]["log"]["threads"] == 1
    assert recs["finetune"]["log"]["excluded_entities"] == []
    assert recs["finetune_oracle"]["log"]["excluded_entities"] == sorted(small_bench.forget_set("forget15"))
    assert list(ev) == list(jobs)
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
    explicit = C.load(DemoConfig, None, ["data.num_people=40", "eval.forget_set=forget10"], base=defaults())
    assert (explicit.data.num_people, explicit.eval.forget_set) == (40, "forget10")
