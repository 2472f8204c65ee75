"""The one evaluation path for the core protocol: every split x {VQA, QA} x {multiple choice, cloze,
generation}, batched.

Multiple choice is scored by option log-likelihood (``likelihood``, the default) or, as MLLMU-Bench does, by
generating after the options and parsing the first letter (``letter``). Generation is scored by exact match
(normalised) and ROUGE-L F1; cloze by whether the ground truth appears in the output. Identity questions also
report how often the entity's name appears in the answer (the MMUBench generality signal).

``paper_exact`` replaces prompts, parsing and budgets by the official scripts' (``eval.prompts``,
docs/paper_exact.md); results record which mode produced them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from mmunlearn import distributed as D
from mmunlearn.data.batches import ImageCache, to_items
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError
from mmunlearn.eval import metrics, prompts
from mmunlearn.eval.cache import EvalCache
from mmunlearn.eval.scoring import answer_logprobs, generate_batched, rank_options
from mmunlearn.models.base import Item, ModelAdapter

LETTERS = "ABCD"
MC_SUFFIX = "Just give ONE letter representing the answer directly."
LETTER_TOKENS = 4  # tokens generated to find the letter when the first token has no alphanumeric character


PROTOCOLS = ("mmubench", "mllmu", "clear")


@dataclass
class EvalConfig:
    forget_set: str = "forget10"
    splits: tuple[str, ...] = ("forget", "retain", "test", "utility", "real")
    batch_size: int = 64
    max_new_tokens: int = 24
    mc_mode: str = "likelihood"
    samples: int = 3  # example generations kept per split and kind
    protocols: tuple[str, ...] = PROTOCOLS  # summaries added on top of the per-split scores
    judge: str = "keyword"  # MMUBench G-Eval judge: keyword | embedding | http:<url>|<model>
    reference: str | None = None  # the original (vanilla) model, for C-Dis, fluency and MIA ROUGE
    cache: bool = True
    limit: int | None = None  # at most this many questions per split, kind and probe set (quick checks)
    cache_dir: str | None = None  # default: $MMUNLEARN_CACHE or ~/.cache/mmunlearn, then /eval
    # the official scripts' prompts, answer parsing, generation budgets and matching (docs/paper_exact.md);
    # multiple choice is then read from generated letters whatever mc_mode says
    paper_exact: bool = False

    def __post_init__(self) -> None:
        if self.mc_mode not in ("likelihood", "letter"):
            raise ConfigError(f"mc_mode must be 'likelihood' or 'letter', got {self.mc_mode!r}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ConfigError(f"unknown protocol(s) {bad}; available: {', '.join(PROTOCOLS)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be >= 1")


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def mc_prompt(e: Example) -> str:
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(e.options or []))
    return f"{e.prompt}\n{opts}\n{MC_SUFFIX}"


def mode_of(cfg: EvalConfig) -> str:
    """The name of the evaluation mode, recorded beside every number."""
    return "paper_exact" if cfg.paper_exact else "default"


def score_mc_official(adapter: ModelAdapter, bench: Benchmark, ex: list[Example], images: ImageCache,
                      batch_size: int) -> list[int | None]:
    """Multiple choice as the official script of the benchmark reads it: its prompt, greedy, the first ASCII
    letter or digit within the script's budget of new tokens (50). One token is generated first; only rows
    whose token holds no such character get the rest of the budget (greedy, so the answer is the same)."""
    protocol = prompts.protocol_of(bench)
    items = [prompts.official_item(adapter, protocol, e, images.get(e)) for e in ex]
    outs = generate_batched(adapter, items, batch_size, max_new_tokens=1)
    again = [i for i, o in enumerate(outs) if prompts.official_letter(o) is None]
    budget = prompts.NEW_TOKENS[protocol]
    for i, o in zip(again, generate_batched(adapter, [items[i] for i in again], batch_size, budget)):
        outs[i] = o
    return [prompts.official_choice(o, len(e.options or [])) for o, e in zip(outs, ex)]


def score_mc(adapter: ModelAdapter, ex: list[Example], images: ImageCache, cfg: EvalConfig) -> list[int | None]:
    if cfg.mc_mode == "likelihood":
        return list(rank_options(adapter, ex, images, cfg.batch_size))
    items = [Item(mc_prompt(e), "", images.get(e)) for e in ex]
    # the answer is the first alphanumeric character: one token settles it unless that token has none
    outs = generate_batched(adapter, items, cfg.batch_size, max_new_tokens=1)
    again = [i for i, o in enumerate(outs) if not any(c.isalnum() for c in o)]
    for i, o in zip(again, generate_batched(adapter, [items[i] for i in again], cfg.batch_size, LETTER_TOKENS)):
        outs[i] = o
    letters = [metrics.first_letter(o, LETTERS) for o in outs]
    return [LETTERS.index(x) if x else None for x in letters]


def evaluate(
    adapter: ModelAdapter, bench: Benchmark, cfg: EvalConfig, forget: Sequence[str] | None = None,
    progress: bool = True, cache: EvalCache | None = None, reference: ModelAdapter | None = None,
) -> dict:
    """Scores per split and kind, then the protocol summaries; ``forget`` overrides the named forget set.

    With a ``cache`` every (split, kind) unit and protocol is stored as soon as it is computed, and reused.
    """
    fset = forget if forget is not None else cfg.forget_set
    adapter.model.eval()
    results: dict = {}
    todo = [(s, k) for s in cfg.splits for k in ("vqa", "qa")]
    for split, kind in tqdm(todo, desc="evaluate", disable=not progress, leave=False):
        unit = f"{split}-{kind}"
        r = cached(cache, unit)
        if r is None:
            r = _score_unit(adapter, bench, bench.select(split, fset, purpose="eval", kind=kind)[: cfg.limit], cfg)
            if split == "retain" and kind == "vqa" and r:
                r.update(heldout_naming(adapter, bench, fset, cfg))
            if cache and D.is_main():
                cache.put(unit, r)
        if r:
            results.setdefault(split, {})[kind] = r
    if "mmubench" in cfg.protocols:
        from mmunlearn.eval.concept import concept_metrics
        from mmunlearn.eval.judges import make_judge

        entities = sorted(bench.forget_set(fset) if isinstance(fset, str) else fset)
        r = cached(cache, "mmubench")
        if r is None:
            r = concept_metrics(adapter, bench, entities, reference, make_judge(cfg.judge), cfg.batch_size,
                                cfg.max_new_tokens, limit=cfg.limit, paper_exact=cfg.paper_exact)
            if cache and D.is_main():
                cache.put("mmubench", r)
        results["mmubench"] = r
    if "mllmu" in cfg.protocols:
        results["mllmu"] = mllmu_summary(results)
    if "clear" in cfg.protocols:
        results["clear"] = clear_summary(results)
    return results


def cached(cache: EvalCache | None, unit: str) -> dict | None:
    """A unit's cached result; with several processes rank 0's look-up (only rank 0 writes the cache), so
    every rank computes the same units together."""
    if cache is None:
        return None
    return D.broadcast_object(cache.get(unit) if D.is_main() else None)


def mllmu_summary(results: dict) -> dict[str, float]:
    """MLLMU-Bench's table: MC accuracy, cloze accuracy, ROUGE-L and BLEU per split and VQA/QA."""
    out = {}
    for split in ("forget", "test", "retain", "real"):
        for kind in ("vqa", "qa"):
            r = results.get(split, {}).get(kind, {})
            for key, name in (("mc_acc", "mc"), ("cloze_acc", "cloze"), ("gen_rougeL", "rougeL"), ("gen_bleu", "bleu")):
                if key in r:
                    out[f"{split}_{kind}_{name}"] = r[key]
    return out


def clear_summary(results: dict) -> dict[str, float]:
    """CLEAR's table: name multiple choice on forget/retain, generation ROUGE-L, text QA against its own
    answers, and real-world accuracy."""
    out = {}
    for split in ("forget", "retain"):
        r = results.get(split, {})
        if "mc_acc_identity" in r.get("vqa", {}):
            out[f"{split}_name_mc"] = r["vqa"]["mc_acc_identity"]
        if "gen_rougeL" in r.get("vqa", {}):
            out[f"{split}_vqa_rougeL"] = r["vqa"]["gen_rougeL"]
        if "gen_rougeL" in r.get("qa", {}):
            out[f"{split}_textqa_rougeL"] = r["qa"]["gen_rougeL"]
    for kind in ("vqa", "qa"):
        if "mc_acc" in results.get("real", {}).get(kind, {}):
            out[f"real_{kind}_acc"] = results["real"][kind]["mc_acc"]
    return out


def heldout_naming(adapter: ModelAdapter, bench: Benchmark, forget: str | Sequence[str], cfg: EvalConfig) -> dict:
    """Specificity on images no training saw: % of identity answers on the held-out views of *retained*
    entities that contain the entity's name (``name_rate_heldout``, higher = better; the forget side of the same
    question is the test split's ``name_rate``, lower = more forgotten)."""
    f = bench.forget_set(forget) if isinstance(forget, str) else set(forget)
    names = bench.entity_names()
    ex = [e for e in bench.examples if e.split == "test" and e.purpose == "eval" and e.kind == "vqa"
          and e.task == "gen" and e.qtype == "identity" and e.entity not in f and names.get(e.entity)][: cfg.limit]
    if not ex:
        return {}
    images = ImageCache(bench)
    outs = generate_batched(adapter, to_items(ex, images), cfg.batch_size, cfg.max_new_tokens)
    return {"name_rate_heldout": name_rate(list(zip(ex, outs)), names), "name_heldout_n": len(ex)}


def name_rate(answers: list[tuple[Example, str]], names: dict) -> float:
    """% of (question, answer) pairs whose answer names the question's entity (higher = still recognised)."""
    return 100 * sum(metrics.mentions(o, names[e.entity]) for e, o in answers) / len(answers)


def _score_unit(adapter: ModelAdapter, bench: Benchmark, ex: list[Example], cfg: EvalConfig) -> dict:
    """Every metric of one split and kind."""
    images = ImageCache(bench)
    names = bench.entity_names()
    r: dict = {}
    if not ex:
        return r
    mc = [e for e in ex if e.task == "mc"]
    if mc:
        pred = (score_mc_official(adapter, bench, mc, images, cfg.batch_size) if cfg.paper_exact
                else score_mc(adapter, mc, images, cfg))
        r["mc_acc"] = metrics.mc_accuracy(pred, [e.answer_index for e in mc])
        r["mc_n"] = len(mc)
        ident = [(p, e) for p, e in zip(pred, mc) if e.qtype == "identity"]
        if ident:
            r["mc_acc_identity"] = metrics.mc_accuracy([p for p, _ in ident], [e.answer_index for _, e in ident])
    gen = [e for e in ex if e.task in ("gen", "cloze")]
    if gen:
        if cfg.paper_exact:
            protocol = prompts.protocol_of(bench)
            items = [prompts.official_item(adapter, protocol, e, images.get(e)) for e in gen]
            outs = generate_batched(adapter, items, cfg.batch_size, prompts.NEW_TOKENS[protocol])
        else:
            items = to_items(gen, images)
            outs = generate_batched(adapter, items, cfg.batch_size, cfg.max_new_tokens)
        g = [(e, o) for e, o in zip(gen, outs) if e.task == "gen"]
        c = [(e, o) for e, o in zip(gen, outs) if e.task == "cloze"]
        if g:
            r["gen_em"] = 100 * sum(normalise(o) == normalise(e.answer) for e, o in g) / len(g)
            scores = metrics.generation_scores([o for _, o in g], [e.answer for e, _ in g])
            r.update({f"gen_{k}": v for k, v in scores.items()})
            r["gen_n"] = len(g)
            # language kept: perplexity of the reference answers (answer tokens, end of turn included); on the
            # retain and utility splits the fluency outside the forget set (lower = better)
            lps = answer_logprobs(adapter, [Item(e.prompt, e.answer, images.get(e)) for e, _ in g], cfg.batch_size)
            r["gen_ppl"] = metrics.perplexity([v for row in lps for v in row])
            ident = [(e, o) for e, o in g if e.qtype == "identity" and names.get(e.entity)]
            if ident:
                r["name_rate"] = name_rate(ident, names)
        if c:
            r["cloze_acc"] = metrics.cloze_accuracy([o for _, o in c], [e.answer for e, _ in c])
            r["cloze_n"] = len(c)
        r["samples"] = [  # the prompt as the model was asked (a paper-exact prompt in full)
            {"prompt": it.text if it.text is not None else it.prompt, "image": e.image, "answer": e.answer, "output": o}
            for e, it, o in list(zip(gen, items, outs))[: cfg.samples]
        ]
    return r
