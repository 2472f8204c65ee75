"""Batched evaluation vs a naive one-sample-at-a-time loop, on the same model and data, in one run.

    python bench/eval_speed.py [--model DIR] [--data DIR] [--n 96]

Without --model a freshly built tiny model is used (random weights: every answer runs to max_new_tokens, so
early stopping does not flatter the batched path). Prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mmunlearn.commands import open_model
from mmunlearn.data.batches import ImageCache, to_items
from mmunlearn.data.fictitious import FictitiousConfig, make_fictitious
from mmunlearn.data.schema import Benchmark
from mmunlearn.eval.runner import EvalConfig, generate
from mmunlearn.eval.scoring import rank_options
from mmunlearn.models.base import Item


@torch.no_grad()
def naive(adapter, gen_items, mc_examples, images, max_new_tokens):
    """What one-off evaluation scripts do: one generate() per prompt, one forward per option."""
    outs = []
    for it in gen_items:
        enc = adapter.to_device(adapter.encode([it], with_answer=False))
        out = adapter.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=adapter.tokenizer.pad_token_id)
        outs.append(adapter.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    preds = []
    for e in mc_examples:
        scores = []
        for opt in e.options:
            b = adapter.to_device(adapter.encode([Item(e.prompt, opt, images.get(e))]))
            labels = b.pop("labels")
            b.pop("answer_start")
            logits = adapter.model(**b).logits[0, :-1]
            tgt = labels[0, 1:]
            m = tgt != -100
            scores.append(torch.log_softmax(logits[m], -1).gather(-1, tgt[m, None]).sum().item())
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    return outs, preds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data")
    ap.add_argument("--n", type=int, default=96, help="generation prompts and MC questions, each")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    data = args.data or make_fictitious(tempfile.mkdtemp() + "/d", FictitiousConfig(num_people=12)).root
    bench = Benchmark.load(data)
    adapter = open_model(args.model, bench)
    adapter.model.eval()
    images = ImageCache(bench)
    gen = [e for e in bench.examples if e.purpose == "eval" and e.task in ("gen", "cloze")][: args.n]
    mc = [e for e in bench.examples if e.task == "mc"][: args.n]
    items = to_items(gen, images)
    cfg = EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    device = next(adapter.model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generate(adapter, items[:4], 4, 4)  # warm-up
    sync()
    t = time.perf_counter()
    batched_out = generate(adapter, items, cfg.batch_size, cfg.max_new_tokens)
    batched_mc = rank_options(adapter, mc, images, cfg.batch_size * 2)
    sync()
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    naive_out, naive_mc = naive(adapter, items, mc, images, cfg.max_new_tokens)
    sync()
    t_naive = time.perf_counter() - t
    agree_mc = sum(a == b for a, b in zip(batched_mc, naive_mc)) / len(mc)
    agree_gen = sum(a.strip() == b.strip() for a, b in zip(batched_out, naive_out)) / len(gen)
    print(f"device: {device}, threads: {torch.get_num_threads()}, model: {args.model}")
    print(f"{len(gen)} generations (max {cfg.max_new_tokens} new tokens) + {len(mc)} 4-option MC questions")
    print(f"batched evaluation: {t_batched:.2f} s")
    print(f"naive loop:         {t_naive:.2f} s")
    print(f"speed-up (naive / batched): {t_naive / t_batched:.1f}x")
    print(f"agreement: MC {agree_mc:.0%}, generations {agree_gen:.0%}")


if __name__ == "__main__":
    main()
