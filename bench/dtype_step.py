"""Seconds per fine-tuning step of a model in float32 and in bfloat16 weights, on this machine.

    python bench/dtype_step.py --data DIR [--model smol] [--steps 6] [--batch-size 8]

Runs the vanilla fine-tune's own step (``Engine.step`` on ``finetune.micro_steps``: the answer cross-entropy of a
batch of the benchmark's training examples, images included) on the model loaded once per dtype, first a warm-up
step, then ``--steps`` timed ones, and prints the median seconds per step of each and their ratio. In bfloat16
the engine keeps fp32 master weights, as on a GPU; whether the CPU has bfloat16 instructions
(``mmunlearn.models.cpu_has_bf16``) is printed beside it, since without them bfloat16 is emulated and slower.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmunlearn.commands import open_model
from mmunlearn.data.batches import BatchStream, ImageCache
from mmunlearn.data.schema import Benchmark
from mmunlearn.models import cpu_has_bf16
from mmunlearn.train.engine import Engine
from mmunlearn.train.finetune import FinetuneConfig, micro_steps, training_examples
from mmunlearn.train.recipes import finetune_preset


def seconds_per_step(model: str, bench: Benchmark, dtype: str, steps: int, batch_size: int) -> float:
    adapter = open_model(model, bench, dtype=dtype)
    cfg = FinetuneConfig(**{**finetune_preset(model), "batch_size": batch_size})
    engine = Engine(adapter, cfg.optim(steps + 1), seed=cfg.seed)
    stream = BatchStream(adapter, training_examples(bench, cfg.oversample_text), ImageCache(bench), batch_size,
                         seed=cfg.seed)
    adapter.model.train()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        engine.step(micro_steps(adapter, stream, 1))
        if i:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="benchmark directory (mmunlearn make-data)")
    ap.add_argument("--model", default="smol", help="smol, tiny or a model directory")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    bench = Benchmark.load(args.data)
    fp32 = seconds_per_step(args.model, bench, "float32", args.steps, args.batch_size)
    bf16 = seconds_per_step(args.model, bench, "bfloat16", args.steps, args.batch_size)
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, bfloat16 instructions: "
          f"{cpu_has_bf16()}: float32 {fp32:.2f} s/step, bfloat16 {bf16:.2f} s/step, ratio {fp32 / bf16:.2f}")


if __name__ == "__main__":
    main()
