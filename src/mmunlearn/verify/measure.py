"""One model's measurements on the forget entities, the raw material of every verification check.

Measured the same way for the unlearned model, the vanilla model and the oracle, so that each check compares
like with like; ``verdict.compare`` turns three measurements into checks. The result is plain JSON.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mmunlearn.data.batches import ImageCache
from mmunlearn.data.schema import KINDS, Benchmark
from mmunlearn.errors import DataError
from mmunlearn.verify import attacks
from mmunlearn.verify.forget_quality import score_questions
from mmunlearn.verify.mia import mia_aucs
from mmunlearn.verify.options import VerifyConfig
from mmunlearn.verify.probes import run_probes

SPLITS = ("forget", "test")  # questions about the forget entities: their own images, held-out images


def _questions(bench: Benchmark, forget: Sequence[str], kind: str) -> list:
    """Every multiple-choice question of ``kind`` about the forget entities, forget split first."""
    return [e for s in SPLITS for e in bench.select(s, forget, purpose="eval", kind=kind, task="mc")]


def measure(adapter, bench: Benchmark, forget: Sequence[str], cfg: VerifyConfig) -> dict:
    """Scores, truth ratios, attacks, MIA and probes of one model (``adapter`` itself is left unchanged)."""
    images = ImageCache(bench)
    seconds: dict[str, float] = {}
    t = time.time()
    out: dict = {"mc": {}}
    for kind in KINDS:
        by_split = {s: bench.select(s, forget, purpose="eval", kind=kind, task="mc") for s in SPLITS}
        ex = _questions(bench, forget, kind)
        if not ex:
            continue
        r = score_questions(adapter, ex, images, cfg.batch_size)
        correct = {e.id: p == e.answer_index for e, p in zip(ex, r["pred"])}
        r["by_split"] = {s: 100.0 * sum(correct[e.id] for e in by_split[s]) / len(by_split[s])
                         for s in SPLITS if by_split[s]}
        out["mc"][kind] = r
    seconds["mc"] = time.time() - t

    t = time.time()
    try:
        data, measured = attacks.relearn_split(bench, forget, cfg.kind)
    except DataError as e:  # e.g. a benchmark with one question type and one forget entity
        data, measured, out["relearn"] = [], [], {"skipped": str(e), "settings": {}}
    # the measured questions are among the multiple-choice ones scored above: reuse their predictions
    pred = dict(zip([e.id for e in _questions(bench, forget, cfg.kind)], out["mc"].get(cfg.kind, {}).get("pred", [])))
    rel = out.get("relearn") or {
        "n": len(measured), "train_examples": len(data),
        "before": 100.0 * sum(pred[e.id] == e.answer_index for e in measured) / len(measured),
        "taught": sorted({e.qtype for e in data}), "measured": sorted({e.qtype for e in measured}), "settings": {}}
    for s in cfg.relearn if data else ():
        attacked, steps = attacks.relearned_copy(adapter, bench, data, s, cfg.seed)
        rel["settings"][s.name] = {"after": score_questions(attacked, measured, images, cfg.batch_size)["acc"],
                                   "steps": steps, "lr": s.lr, "lora_r": s.lora_r, "epochs": s.epochs}
        del attacked
    out["relearn"] = rel
    seconds["relearn"] = time.time() - t

    t = time.time()
    ex = _questions(bench, forget, cfg.kind)
    base = out["mc"][cfg.kind]
    quant: dict = {}
    for scheme in cfg.quantization:
        if scheme == "nf4" and not attacks.nf4_available():
            quant[scheme] = {"skipped": "bitsandbytes is not installed (pip install 'mmunlearn[nf4]')"}
            continue
        q = attacks.quantized_copy(adapter, scheme, cfg.group_size)
        r = score_questions(q, ex, images, cfg.batch_size)
        # % of questions whose chosen option the rounding left unchanged
        same = 100.0 * sum(a == b for a, b in zip(r["pred"], base["pred"])) / len(ex)
        quant[scheme] = {"acc": r["acc"], "n": r["n"], "same_predictions": same}
        del q
    out["quant"] = quant
    seconds["quant"] = time.time() - t

    t = time.time()
    out["mia"] = mia_aucs(adapter, bench, forget, min(cfg.batch_size, 32), cfg.mia_limit, cfg.seed)
    seconds["mia"] = time.time() - t
    t = time.time()
    out["probes"] = run_probes(adapter, bench, forget, cfg.probes, cfg.languages, cfg.batch_size)
    if not cfg.languages:
        out["probes_note"] = "translated identity prompts not run: no languages given (the model's languages)"
    seconds["probes"] = time.time() - t
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return out
