"""Loss helpers shared by the unlearning methods: pure tensor math on logits and labels, no model code.

Conventions: ``logits`` are (B, T, V) from a causal LM, ``labels`` are (B, T) with -100 everywhere except the
answer tokens (the adapter's encoding). Position t of the logits predicts label t+1, so every helper shifts
once: ``logits[:, :-1]`` against ``labels[:, 1:]``; the "answer positions" are the (B, T-1) entries whose
shifted label is not -100.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from mmunlearn.errors import DataError
from mmunlearn.models.base import IGNORE

NPO_BETA = 0.4


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aligned (B, T-1, V) logits, (B, T-1) targets (ignore -> 0) and the (B, T-1) answer-position mask."""
    lg, tg = logits[:, :-1].float(), labels[:, 1:]
    mask = tg != IGNORE
    return lg, tg.clamp(min=0), mask


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over all answer tokens of the batch (prompt, image and padding excluded).

    CE = −(1/N) Σ_{b,t: answer} log p_θ(y_{b,t} | y_{b,<t}, x_b), N = number of answer tokens; the same value
    as ``model(**batch).loss`` for answer-only labels.
    """
    lg, tg, mask = shift(logits, labels)
    if not mask.any():
        raise DataError("a batch has no answer tokens; every training example needs a non-empty answer")
    nll = F.cross_entropy(lg.transpose(1, 2), tg, reduction="none")  # (B, T-1)
    return (nll * mask).sum() / mask.sum()


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y|x) per sequence: the SUM of its answer-token log-probabilities, shape (B,).

    This is π(y|x) of the NPO loss (Zhang et al. 2024), not a per-token mean (the released MMUnlearner
    code used a batch-mean CE instead).
    """
    lg, tg, mask = shift(logits, labels)
    lp = torch.log_softmax(lg, -1).gather(-1, tg.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def kl_to_reference(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) over the whole vocabulary at each answer position, averaged over answer positions.

    KL = (1/N) Σ_{b,t: answer} Σ_v p_ref(v) (log p_ref(v) − log p_θ(v)): the retain/forget regulariser of
    KL_Min and GA+KL (the "KL minimisation" baseline of TOFU, Maini et al. 2024, used by MLLMU-Bench and SIU),
    the reference being the frozen vanilla model.
    """
    lg, _, mask = shift(logits, labels)
    if not mask.any():
        raise DataError("a batch has no answer tokens; every training example needs a non-empty answer")
    kl = kl_rows(ref_logits[:, :-1].float(), lg)  # (B, T-1)
    return (kl * mask).sum() / mask.sum()


def kl_rows(ref_logits: torch.Tensor, logits: torch.Tensor, vocab_drop: Iterable[int] = (),
            renormalise: bool = False) -> torch.Tensor:
    """Per position Σ_{v ∉ D} p_ref(v) (log p_ref(v) − log p_θ(v)) over the last (vocabulary) axis.

    D = ``vocab_drop``. Without ``renormalise`` p_ref and p_θ are full-vocabulary softmaxes and the dropped
    entries are left out of the sum; with it both are re-normalised over the kept vocabulary first.
    """
    drop = sorted(set(vocab_drop))
    if drop:
        keep_v = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep_v[torch.tensor(drop, device=logits.device)] = False
        if renormalise:
            ref_logits, logits = ref_logits[..., keep_v], logits[..., keep_v]
    log_ref, log_p = torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    if drop and not renormalise:
        log_ref, log_p = log_ref[..., keep_v], log_p[..., keep_v]
    return (log_ref.exp() * (log_ref - log_p)).sum(-1)


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float = NPO_BETA) -> torch.Tensor:
    """NPO: −(2/β) · mean_b log σ(−β · (log π_θ(y_b|x_b) − log π_ref(y_b|x_b))).

    Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective
    Unlearning", the NPO loss (their Eq. 3); ``logp`` and ``logp_ref`` are (B,) sequence
    log-probabilities (``sequence_logprob``: sums, not means), β = 0.4 by default. As β → 0 the gradient tends
    to gradient ascent's; larger β stops pushing a sequence once it is already unlikely.
    """
    if beta <= 0:
        raise DataError(f"NPO beta must be > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


def dmk_loss(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_keep: torch.Tensor | None = None,
    vocab_drop: Iterable[int] = (),
    renormalise: bool = False,
) -> torch.Tensor:
    """Dual Masked KL divergence (DMK) of SIU (Li et al. 2024, "Single Image Unlearning", NeurIPS, §3 DMK loss).

    DMK = (1/|K|) Σ_{(b,t) ∈ K} Σ_{v ∉ D} p_ref(v|b,t) · (log p_ref(v|b,t) − log p_θ(v|b,t))

    * token mask: K = answer positions (shifted label ≠ −100) where ``token_keep`` (B, T-1, bool, aligned with
      the shifted labels) is True; positions whose label token belongs to a sample's ``target_phrase`` are
      excluded by the caller, since they deliberately contradict the reference model;
    * vocabulary mask: D = ``vocab_drop``, the token ids of the concept's name (every casing/spacing variant).

    Choice (following the project's design notes): no renormalisation — p_ref and p_θ are the full-vocabulary
    softmaxes and the dropped entries are simply left out of the sum, so a step that moves probability mass
    off the name tokens is not penalised. ``renormalise=True`` instead re-normalises both distributions over the
    kept vocabulary (a proper KL ≥ 0 between the restricted distributions). Neither divides by the vocabulary
    size (the released code did, which made the term ~1/32000 of a token's CE). An empty K gives 0.
    """
    lg, _, mask = shift(logits, labels)
    ref = ref_logits[:, :-1].float()
    if token_keep is not None:
        if token_keep.shape != mask.shape:
            raise DataError(f"DMK token mask has shape {tuple(token_keep.shape)}, expected {tuple(mask.shape)}")
        mask = mask & token_keep.to(mask.device)
    kl = kl_rows(ref, lg, vocab_drop, renormalise)  # (B, T-1)
    n = mask.sum()
    return (kl * mask).sum() / n.clamp(min=1)


def released_siu_loss(
    ref_logits: torch.Tensor, logits: torch.Tensor, phrase_mask: torch.Tensor, vocab_drop: Iterable[int] = ()
) -> torch.Tensor:
    """The masked term of the released SIU trainer (``llava_trainer.py``, ``training_step``); reproduction only,
    ``dmk_loss`` is the default. Added to the plain answer CE with weight 1 by the caller.

    kl = −Σ_{b, i<L, v} p_ref(v)·m_V(v) · log(p_θ(v)·m_V(v) + 1e-12) · (1 − mask[b,i])
         / (Σ_{b, i<L} (1 − mask[b,i]) · V)

    with ``phrase_mask`` (B, L) = 1 at the target phrase's tokens of the *unexpanded* sequence (image placeholder
    not expanded, so L is shorter than the logits' T on image samples) and 0 elsewhere (padding included),
    p = softmax over the full vocabulary then multiplied by the 0/1 vocabulary mask m_V (no renormalisation),
    logits[:, :L] taken as they are (not shifted against the mask), V the vocabulary size. A cross-entropy of
    p_θ against p_ref, not a KL: it keeps p_ref's entropy.
    """
    n = phrase_mask.shape[1]
    lg, ref = logits[:, :n].float(), ref_logits[:, :n].float()
    vocab = lg.shape[-1]
    keep_v = torch.ones(vocab, device=lg.device)
    drop = sorted(set(vocab_drop))
    if drop:
        keep_v[torch.tensor(drop, device=lg.device)] = 0.0
    p_ref = torch.softmax(ref, -1) * keep_v
    p = torch.softmax(lg, -1) * keep_v
    inverse = 1.0 - phrase_mask.to(lg.device, torch.float32)[..., None]  # (B, L, 1)
    return -(p_ref * torch.log(p + 1e-12) * inverse).sum() / (inverse.sum() * vocab)


def released_reference_ce(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The "KL" term of the released SIU baselines (``trainer for baseline/llava_trainer.py``,
    ``compute_kl_loss``); reproduction only, ``kl_to_reference`` is the default.

    −(1/(B·T)) Σ_{b,t} Σ_v p_ref(v) · log(p_θ(v) + 1e-12): a cross-entropy to the reference at every position of
    the batch (prompt and padding included), not a KL over answer positions.
    """
    p_ref = torch.softmax(ref_logits.float(), -1)
    return -(p_ref * torch.log(torch.softmax(logits.float(), -1) + 1e-12)).sum(-1).mean()
