"""The demo's two fine-tunes (vanilla, oracle) side by side on a CPU."""

import torch

from mmunlearn.commands import RUN_FILE
from mmunlearn.demo import run_finetunes
from mmunlearn.outputs import read_json_object
from mmunlearn.train.finetune import FinetuneConfig


def test_two_finetunes_run_side_by_side_and_restore_the_threads(small_bench, tmp_path):
    cfg = dict(steps=3, vision_warmup_steps=0, stop_accuracy=0.0, save_every=0)
    jobs = {"finetune": (str(tmp_path / "vanilla"), FinetuneConfig(**cfg)),
            "finetune_oracle": (str(tmp_path / "oracle"),
                                FinetuneConfig(**cfg, exclude_forget="forget15", exclude_kinds=("vqa",)))}
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the side-by-side path needs two threads to share out
    try:
        recs = run_finetunes(str(small_bench.root), "tiny", jobs, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert set(recs) == set(jobs)
    assert recs["finetune"]["log"]["threads"] == 1 and recs["finetune_oracle"]["log"]["threads"] == 1
    assert recs["finetune"]["log"]["excluded_entities"] == []
    assert recs["finetune_oracle"]["log"]["excluded_entities"] == sorted(small_bench.forget_set("forget15"))
    for out, _ in jobs.values():  # each written to its own directory, in full
        assert read_json_object(f"{out}/{RUN_FILE}", what="run record")["log"]["steps"] == 3
