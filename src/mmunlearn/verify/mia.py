"""Membership inference on the forget data: can an attacker still tell it was trained on?

Members are the forget set's training answers, non-members the same questions with answers never trained on
(``eval.concept.mia_items``). Each sequence gets five scores (higher = more member-like; definitions in
``eval.metrics``): LOSS, zlib, Min-K% at K = 20 % and 40 %, and Min-K%++ at K = 20 %; each gives a ROC-AUC.
privleak compares an AUC with the oracle's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmunlearn.data.schema import Benchmark
from mmunlearn.errors import DataError
from mmunlearn.eval import metrics
from mmunlearn.eval.concept import mia_items
from mmunlearn.eval.scoring import length_batches
from mmunlearn.models.base import IGNORE, Item, ModelAdapter

SCORES = ("loss", "zlib", "min_k_20", "min_k_40", "min_k_pp_20")


@torch.no_grad()
def answer_token_stats(adapter: ModelAdapter, items: Sequence[Item], batch_size: int = 32) -> list[dict]:
    """Per item and answer token t: log p(x_t), and the mean mu_t and standard deviation sigma_t of log p(.)
    under the model's own next-token distribution at t (what Min-K%++ standardises with)."""
    out: list[dict] = [{} for _ in items]
    for idx in length_batches(items, batch_size):
        batch = adapter.to_device(adapter.encode([items[i] for i in idx]))
        labels = batch.pop("labels")[:, 1:]
        batch.pop("answer_start", None)
        mask = labels != IGNORE
        # only answer positions: (N, V) rather than (B, T-1, V), which a real model's image tokens make huge
        logp = torch.log_softmax(adapter.model(**batch).logits[:, :-1][mask].float(), -1)
        lp = logp.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
        mu = (logp.exp() * logp).sum(-1)
        sigma = ((logp.exp() * logp.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
        counts = mask.sum(1).tolist()
        for i, a, b, c in zip(idx, lp.split(counts), mu.split(counts), sigma.split(counts)):
            out[i] = {"lp": a.tolist(), "mu": b.tolist(), "sigma": c.tolist()}
    return out


def sequence_scores(stats: dict, text: str) -> dict[str, float]:
    """The five MIA scores of one sequence from its ``answer_token_stats`` entry and its answer text."""
    lp = stats["lp"]
    return {
        "loss": metrics.loss_score(lp),
        "zlib": metrics.zlib_score(lp, text),
        "min_k_20": metrics.min_k_percent(lp, 0.2),
        "min_k_40": metrics.min_k_percent(lp, 0.4),
        "min_k_pp_20": metrics.min_k_plus_plus(lp, stats["mu"], stats["sigma"], 0.2),
    }


def privleak(auc: float, auc_oracle: float) -> float:
    """privleak (MUSE): (AUC_unlearned - AUC_oracle) / AUC_oracle x 100. 0 = leaks as much as never having
    trained; > 0 = the forget data is more recognisable than for the oracle (under-unlearning); < 0 = less
    (over-unlearning, also a detectable trace)."""
    if auc_oracle <= 0:
        raise DataError(f"privleak needs a positive oracle AUC, got {auc_oracle}")
    return (auc - auc_oracle) / auc_oracle * 100.0


def mia_aucs(adapter: ModelAdapter, bench: Benchmark, forget: Sequence[str], batch_size: int = 32,
             limit: int | None = None, seed: int = 0) -> dict | None:
    """ROC-AUC of each score (members = forget training answers); None when the benchmark has no MIA items."""
    pairs = mia_items(bench, forget, seed)
    if pairs is None:
        return None
    members, nonmembers = pairs
    if limit is not None and limit < len(members):  # evenly spread, so every entity and question type stays in
        keep = [round(i * len(members) / limit) for i in range(limit)]
        members, nonmembers = [members[i] for i in keep], [nonmembers[i] for i in keep]
    stats = answer_token_stats(adapter, members + nonmembers, batch_size)
    rows = [sequence_scores(s, it.answer) for s, it in zip(stats, members + nonmembers)]
    n = len(members)
    return {"n_members": n, "n_nonmembers": len(nonmembers),
            "auc": {k: metrics.mia_auc([r[k] for r in rows[:n]], [r[k] for r in rows[n:]]) for k in SCORES}}
