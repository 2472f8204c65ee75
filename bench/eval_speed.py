"""Batched evaluation vs a naive one-sample-at-a-time loop, on the same model and data, in one run.

    python bench/eval_speed.py [--model DIR] [--data DIR] [--n 96]

The naive loop is what one-off evaluation scripts do: one ``generate()`` per prompt, multiple choice included
(options in the prompt, the first letter parsed). The batched path is the evaluation runner's
(``mmunlearn.eval.scoring``): left-padded batches of similar length with a KV cache that stop once every
sequence has ended, multiple choice either by option likelihood (one pass per question, its KV cache reused for
every option, an image's prefix shared by its questions) or by one generated token per question (letter).
Without --model a freshly built tiny model is used. Prints the times (fastest of --repeat runs) and ratios.
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
from mmunlearn.eval.metrics import first_letter
from mmunlearn.eval.runner import LETTERS, EvalConfig, mc_prompt, score_mc
from mmunlearn.eval.scoring import generate_batched
from mmunlearn.models.base import Item


@torch.no_grad()
def naive(adapter, gen_items, mc_examples, images, max_new_tokens):
    """What one-off evaluation scripts do: one ``generate()`` per prompt, multiple choice included (the
    options in the prompt, the letter parsed from the generated text)."""
    outs = []
    for it in gen_items + [Item(mc_prompt(e), "", images.get(e)) for e in mc_examples]:
        enc = adapter.to_device(adapter.encode([it], with_answer=False))
        out = adapter.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=adapter.tokenizer.pad_token_id)
        outs.append(adapter.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs[: len(gen_items)], [first_letter(o) for o in outs[len(gen_items):]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data")
    ap.add_argument("--n", type=int, default=96, help="generation prompts and MC questions, each")
    ap.add_argument("--batch-size", type=int, default=EvalConfig.batch_size, help="the evaluation default")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="runs of each path; the fastest counts")
    args = ap.parse_args()
    data = args.data or make_fictitious(tempfile.mkdtemp() + "/d", FictitiousConfig(num_people=12)).root
    bench = Benchmark.load(data)
    adapter = open_model(args.model, bench)
    adapter.model.eval()
    images = ImageCache(bench)
    gen = [e for e in bench.examples if e.purpose == "eval" and e.task in ("gen", "cloze")][: args.n]
    mc = [e for e in bench.examples if e.task == "mc"][: args.n]
    items = to_items(gen, images)
    device = next(adapter.model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generate_batched(adapter, items[:4], 4, 4)  # warm-up

    def timed(fn):
        """Fastest of --repeat runs (timing noise on a shared machine only ever adds time)."""
        best, out = float("inf"), None
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best, out

    times, outs = {}, {}
    for mode in ("likelihood", "letter"):
        mode_cfg = EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, mc_mode=mode)
        times[mode], outs[mode] = timed(lambda c=mode_cfg: (
            generate_batched(adapter, items, c.batch_size, c.max_new_tokens), score_mc(adapter, mc, images, c)))
    t_naive, (naive_out, naive_letters) = timed(lambda: naive(adapter, items, mc, images, args.max_new_tokens))
    batched_out, batched_letter_mc = outs["letter"]
    agree_gen = sum(a.strip() == b.strip() for a, b in zip(batched_out, naive_out)) / len(gen)
    naive_mc = [LETTERS.index(x) if x else None for x in naive_letters]
    agree_mc = sum(a == b for a, b in zip(batched_letter_mc, naive_mc)) / len(mc)
    print(f"device: {device}, threads: {torch.get_num_threads()}, model: {args.model}")
    print(f"{len(gen)} generations + {len(mc)} 4-option MC questions, max {args.max_new_tokens} new tokens, "
          f"batch size {args.batch_size}, fastest of {args.repeat} runs each")
    print(f"naive one-sample-at-a-time generate loop: {t_naive:.2f} s")
    for mode, t in times.items():
        print(f"batched evaluation (MC by {mode}): {t:.2f} s  -> speed-up {t_naive / t:.1f}x")
    print(f"agreement with the naive loop: generations {agree_gen:.0%}, MC letters {agree_mc:.0%}")


if __name__ == "__main__":
    main()
