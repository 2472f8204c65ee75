"""How well the tiny model's vision warm-up tells people apart on views that no training sees.

    python bench/warmup_probe.py --data DIR [--set vision_warmup_steps=1200 ...] [--no-identity-views]

Runs the fine-tuning recipe's vision warm-up (``mmunlearn.train.finetune.vision_warmup``) on a freshly built tiny
model with the benchmark's training examples, and its question-free identity views unless --no-identity-views,
then scores the warm-up's identity head: the share of images whose person it names right (higher = better), on
the training images and on the held-out views of every person (the test split's images). The vanilla model's
test VQA asks about those held-out views, so this is a cheap view of what the full fine-tune can reach there.
Prints one line of figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mmunlearn.commands import open_model
from mmunlearn.config import load
from mmunlearn.data.batches import open_image
from mmunlearn.data.schema import Benchmark
from mmunlearn.train.finetune import FinetuneConfig, training_examples, vision_warmup, warmup_features


@torch.no_grad()
def named_right(adapter, warm, images: dict[Path, str], batch: int = 256) -> float:
    """Share of ``images`` (path -> entity) whose entity the warm-up's head ranks first."""
    adapter.model.eval()
    paths = sorted(images)
    right = 0
    for lo in range(0, len(paths), batch):
        part = paths[lo:lo + batch]
        pix = adapter.processor.image_processor([open_image(p) for p in part], return_tensors="pt")["pixel_values"]
        pred = warm.head(warmup_features(adapter, pix)).argmax(-1).tolist()
        right += sum(warm.classes[k] == images[p] for k, p in zip(pred, part))
    return right / max(1, len(paths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--set", action="append", default=[], help="key=value of the fine-tuning config")
    ap.add_argument("--no-identity-views", action="store_true", help="warm up on the question images only")
    args = ap.parse_args()
    bench = Benchmark.load(args.data)
    if args.no_identity_views:
        bench.info = {k: v for k, v in bench.info.items() if k != "identity_views"}
    cfg = load(FinetuneConfig, overrides=args.set)
    adapter = open_model("tiny", bench)
    examples = training_examples(bench, cfg.oversample_text)
    t0, cpu0 = time.time(), time.process_time()
    warm = vision_warmup(adapter, bench, examples, cfg, progress=False)
    seconds, cpu = time.time() - t0, time.process_time() - cpu0
    people = set(bench.info.get("entities", {}))
    train = {bench.image_path(e): e.entity for e in examples if e.image and e.entity in people}
    held = {bench.image_path(e): e.entity for e in bench.examples if e.split == "test" and e.image}
    print(f"people {len(people)}  identity views {sum(map(len, bench.identity_views().values()))}  "
          f"steps {warm.steps}  loss {warm.loss:.3f}  {seconds:.0f} s ({cpu:.0f} CPU s)  "
          f"named right: training images {named_right(adapter, warm, train):.3f} ({len(train)}), "
          f"held-out views {named_right(adapter, warm, held):.3f} ({len(held)})")


if __name__ == "__main__":
    main()
