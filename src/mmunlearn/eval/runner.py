"""The one evaluation path for the core protocol: every split x {VQA, QA} x {multiple choice, cloze,
generation}, batched.

Multiple choice is scored by option log-likelihood (``likelihood``, the default) or, as MLLMU-Bench does, by
generating after the options and parsing the first letter (``letter``). Generation is scored by exact match
(normalised) and ROUGE-L F1; cloze by whether the ground truth appears in the output. Identity questions also
report how often the entity's name appears in the answer (the MMUBench generality signal).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from mmunlearn.data.batches import ImageCache, to_items
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError
from mmunlearn.eval import metrics
from mmunlearn.eval.scoring import rank_options
from mmunlearn.models.base import Item, ModelAdapter

LETTERS = "ABCD"
MC_SUFFIX = "Just give ONE letter representing the answer directly."


@dataclass
class EvalConfig:
    forget_set: str = "forget10"
    splits: tuple[str, ...] = ("forget", "retain", "test", "utility", "real")
    batch_size: int = 64
    max_new_tokens: int = 24
    mc_mode: str = "likelihood"
    samples: int = 3  # example generations kept per split and kind

    def __post_init__(self) -> None:
        if self.mc_mode not in ("likelihood", "letter"):
            raise ConfigError(f"mc_mode must be 'likelihood' or 'letter', got {self.mc_mode!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be >= 1")


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def generate(adapter: ModelAdapter, items: Sequence[Item], batch_size: int, max_new_tokens: int) -> list[str]:
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        out += adapter.generate(list(items[i : i + batch_size]), max_new_tokens=max_new_tokens)
    return out


def mc_prompt(e: Example) -> str:
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(e.options or []))
    return f"{e.prompt}\n{opts}\n{MC_SUFFIX}"


def score_mc(adapter: ModelAdapter, ex: list[Example], images: ImageCache, cfg: EvalConfig) -> list[int | None]:
    if cfg.mc_mode == "likelihood":
        return list(rank_options(adapter, ex, images, cfg.batch_size))
    items = [Item(mc_prompt(e), "", images.get(e)) for e in ex]
    outs = generate(adapter, items, cfg.batch_size, max_new_tokens=2)
    letters = [metrics.first_letter(o, LETTERS) for o in outs]
    return [LETTERS.index(x) if x else None for x in letters]


def evaluate(
    adapter: ModelAdapter, bench: Benchmark, cfg: EvalConfig, forget: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Scores per split and kind; ``forget`` overrides the named forget set with explicit entity ids."""
    images = ImageCache(bench)
    fset = forget if forget is not None else cfg.forget_set
    names = bench.info.get("names") or {k: v.get("name") for k, v in bench.info.get("entities", {}).items()}
    adapter.model.eval()
    results: dict = {}
    todo = [(s, k) for s in cfg.splits for k in ("vqa", "qa")]
    for split, kind in tqdm(todo, desc="evaluate", disable=not progress, leave=False):
        ex = bench.select(split, fset, purpose="eval", kind=kind)
        if not ex:
            continue
        r: dict = {}
        mc = [e for e in ex if e.task == "mc"]
        if mc:
            pred = score_mc(adapter, mc, images, cfg)
            r["mc_acc"] = metrics.mc_accuracy(pred, [e.answer_index for e in mc])
            r["mc_n"] = len(mc)
        gen = [e for e in ex if e.task in ("gen", "cloze")]
        if gen:
            outs = generate(adapter, to_items(gen, images), cfg.batch_size, cfg.max_new_tokens)
            g = [(e, o) for e, o in zip(gen, outs) if e.task == "gen"]
            c = [(e, o) for e, o in zip(gen, outs) if e.task == "cloze"]
            if g:
                r["gen_em"] = 100 * sum(normalise(o) == normalise(e.answer) for e, o in g) / len(g)
                r["gen_rougeL"] = sum(metrics.rouge(o, e.answer)["rougeL"] for e, o in g) / len(g)
                r["gen_n"] = len(g)
                ident = [(e, o) for e, o in g if e.qtype == "identity" and names.get(e.entity)]
                if ident:
                    r["name_rate"] = 100 * sum(metrics.mentions(o, names[e.entity]) for e, o in ident) / len(ident)
            if c:
                r["cloze_acc"] = metrics.cloze_accuracy([o for _, o in c], [e.answer for e, _ in c])
                r["cloze_n"] = len(c)
            r["samples"] = [
                {"prompt": e.prompt, "image": e.image, "answer": e.answer, "output": o}
                for e, o in list(zip(gen, outs))[: cfg.samples]
            ]
        results.setdefault(split, {})[kind] = r
    return results
