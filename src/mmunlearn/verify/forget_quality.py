"""Forget quality (TOFU): is the unlearned model's belief on the forget questions distributed like the oracle's?

Per multiple-choice question the *truth ratio* compares the wrong options with the correct one; forget quality is
the two-sample Kolmogorov-Smirnov p-value between the truth ratios of the unlearned model and of the oracle (the
model retrained without the forget data). A high p-value: indistinguishable from never having learned; a low one:
the model still behaves differently on these questions, whether it knows the answers (vanilla) or systematically
avoids them (below-chance over-unlearning, which is itself information about the answers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mmunlearn.data.batches import ImageCache
from mmunlearn.data.schema import Example
from mmunlearn.errors import DataError
from mmunlearn.eval.scoring import option_logprobs
from mmunlearn.models.base import Item, ModelAdapter


def truth_ratio(option_scores: Sequence[float], option_lengths: Sequence[int], answer_index: int) -> float:
    """TR = mean_i P(w_i|q)^(1/|w_i|) / P(a|q)^(1/|a|) over the wrong options w_i and the correct answer a.

    ``option_scores`` are summed log-probs of each option's tokens, ``option_lengths`` their token counts.
    Length-normalised likelihoods as in TOFU. TR < 1: the correct answer is preferred (knows it); TR ~ 1: no
    preference; TR > 1: the wrong options are preferred (avoids the answer). Computed in log space.
    """
    if len(option_scores) != len(option_lengths) or len(option_scores) < 2:
        raise DataError("truth_ratio needs a score and a length for each of at least two options")
    if not 0 <= answer_index < len(option_scores):
        raise DataError(f"answer_index {answer_index} is not an option index")
    if any(n < 1 for n in option_lengths):
        raise DataError("option lengths must be >= 1 token")
    norm = [s / n for s, n in zip(option_scores, option_lengths)]
    wrong = np.array([v for i, v in enumerate(norm) if i != answer_index])
    log_mean_wrong = float(np.logaddexp.reduce(wrong) - math.log(wrong.size))
    return math.exp(min(700.0, log_mean_wrong - norm[answer_index]))


def forget_quality(model_ratios: Sequence[float], oracle_ratios: Sequence[float]) -> float:
    """Two-sample KS test p-value (scipy ``ks_2samp``, two-sided) between two truth-ratio samples, in [0, 1].

    1 = identical distributions; higher = closer to the oracle (better forgetting).
    """
    from scipy.stats import ks_2samp

    if len(model_ratios) == 0 or len(oracle_ratios) == 0:
        raise DataError("forget quality needs truth ratios of both models")
    return float(ks_2samp(np.asarray(model_ratios, float), np.asarray(oracle_ratios, float)).pvalue)


def option_lengths(adapter: ModelAdapter, examples: Sequence[Example]) -> list[list[int]]:
    """Token count of each option as an answer (end of turn included), as the scorer counts it."""
    pairs = [(e, o) for e in examples for o in e.options or []]
    ids = adapter.answer_token_ids([Item(e.prompt, o, None) for e, o in pairs])
    flat = [len(t) if t is not None else len(adapter.tokenizer(o, add_special_tokens=False)["input_ids"]) + 1
            for (_, o), t in zip(pairs, ids)]
    out, k = [], 0
    for e in examples:
        n = len(e.options or [])
        out.append(flat[k : k + n])
        k += n
    return out


def score_questions(
    adapter: ModelAdapter, examples: Sequence[Example], images: ImageCache, batch_size: int = 64
) -> dict:
    """Multiple-choice predictions, accuracy (%) and truth ratios of ``examples`` (one model pass over options)."""
    if not examples:
        return {"n": 0}
    prompts = [Item(e.prompt, "", images.get(e)) for e in examples]
    scores = option_logprobs(adapter, prompts, [e.options or [] for e in examples], batch_size)
    lengths = option_lengths(adapter, examples)
    pred = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = [p == e.answer_index for p, e in zip(pred, examples)]
    return {
        "n": len(examples),
        "acc": 100.0 * sum(correct) / len(examples),
        "pred": pred,
        "truth_ratios": [truth_ratio(s, n, e.answer_index) for s, n, e in zip(scores, lengths, examples)],
    }
