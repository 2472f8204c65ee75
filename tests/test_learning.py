"""End to end: a reduced built-in benchmark is learned by the tiny model (visual AND textual path)."""

from mmunlearn.commands import open_model
from mmunlearn.eval.runner import EvalConfig, evaluate
from mmunlearn.train.finetune import FinetuneConfig, finetune


def test_tiny_model_learns_reduced_benchmark(small_bench):
    adapter = open_model("tiny", small_bench)
    cfg = FinetuneConfig(steps=350, vision_warmup_steps=200, batch_size=16, log_every=50)
    log = finetune(adapter, small_bench, cfg, progress=False)
    assert log["history"][-1]["loss"] < log["history"][0]["loss"] / 4
    res = evaluate(adapter, small_bench, EvalConfig(forget_set="forget15", splits=("forget", "retain")),
                   progress=False)
    # chance is 25 %: the image path and the text path must both have learned
    for split in ("forget", "retain"):
        for kind in ("vqa", "qa"):
            assert res[split][kind]["mc_acc"] >= 70, (split, kind, res[split][kind]["mc_acc"])
