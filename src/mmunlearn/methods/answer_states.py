"""Memory-lean losses: the LM head only at answer positions, vocabulary terms in chunks of positions.

Over 90 % of a LLaVA training sequence is image and prompt tokens, where no loss is taken; a (B, T, V) fp32
logit tensor is 4·B·T·V bytes (5 GB per 8k tokens at Qwen2-VL's V = 152064) and every vocabulary-sized term
(log-softmax, probabilities, their gradients) makes another. So the losses here start from the final hidden
states, gather the N answer positions (shifted label ≠ −100) *before* the LM head, and evaluate the head and
the vocabulary term ``chunk`` positions at a time under activation checkpointing: the backward recomputes one
chunk's logits at a time, so peak memory is O(chunk · V), not O(B · T · V).

The values equal the full-logit definitions of ``losses.py`` (same shift, same masks, same reductions) up to
float rounding; ``tests/test_answer_states.py`` checks 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmunlearn.errors import DataError
from mmunlearn.methods.losses import kl_rows
from mmunlearn.models.base import IGNORE, ModelAdapter

# bytes of fp32 logits one chunk may hold: 64 Mi entries = 256 MB (441 positions at V = 152064)
CHUNK_LOGITS = 1 << 26


@dataclass
class AnswerStates:
    """The final hidden states at a batch's answer positions, and what the losses need beside them.

    hidden: (N, H) states that predict the answer tokens (position t predicts label t+1);
    targets: (N,) those label tokens; rows: (N,) the batch row of each; index: (N,) flat position in the
    shifted (B, T−1) grid, for per-position masks; head: the LM head (a frozen reference brings its own).
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    index: torch.Tensor
    batch_size: int
    head: Callable[[torch.Tensor], torch.Tensor]
    chunk: int = 0  # positions per chunk; 0 = from CHUNK_LOGITS and the vocabulary size

    @property
    def n(self) -> int:
        return int(self.targets.numel())

    def chunk_size(self, vocab: int) -> int:
        return self.chunk or max(1, CHUNK_LOGITS // max(1, vocab))

    def logits(self, lo: int, hi: int) -> torch.Tensor:
        """fp32 logits of positions [lo, hi): (hi − lo, V)."""
        return self.head(self.hidden[lo:hi]).float()


def select(hidden: torch.Tensor, labels: torch.Tensor, head: Callable, chunk: int = 0) -> AnswerStates:
    """Gather the answer positions of (B, T, H) hidden states given (B, T) labels (−100 off the answer)."""
    target = labels[:, 1:]
    mask = target != IGNORE
    if not mask.any():
        raise DataError("a batch has no answer tokens; every training example needs a non-empty answer")
    rows, cols = mask.nonzero(as_tuple=True)
    return AnswerStates(hidden=hidden[:, :-1][rows, cols], targets=target[rows, cols], rows=rows,
                        index=rows * target.shape[1] + cols, batch_size=labels.shape[0], head=head, chunk=chunk)


def from_batch(adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> AnswerStates:
    """Answer-position states of ``adapter.model`` on a batch from ``adapter.encode`` (the backbone runs on
    every position; the LM head is left for the loss, which applies it at answer positions only)."""
    inputs = adapter.to_device(batch)
    labels = inputs.pop("labels")
    inputs.pop("answer_start", None)
    body, head = adapter.backbone_and_head()
    if adapter.touch_vision and "pixel_values" not in inputs:  # sharded vision tower (train/fsdp.py)
        with adapter.vision_touched():
            hidden = body(**inputs, use_cache=False).last_hidden_state
    else:
        hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    return select(hidden, labels, head)


def _chunks(states: AnswerStates, fn: Callable[..., torch.Tensor], *per_position: torch.Tensor,
            vocab: int) -> list[torch.Tensor]:
    """``fn(lo, hi, *slices)`` over chunks of positions, checkpointed when gradients flow (so each chunk's
    logits are recomputed in the backward instead of being kept)."""
    size = states.chunk_size(vocab)
    out = []
    for lo in range(0, states.n, size):
        hi = min(states.n, lo + size)
        args = [t[lo:hi] for t in per_position]
        if torch.is_grad_enabled() and states.hidden.requires_grad:
            out.append(checkpoint(fn, lo, hi, *args, use_reentrant=False))
        else:
            out.append(fn(lo, hi, *args))
    return out


def vocab_size(states: AnswerStates) -> int:
    head = getattr(states.head, "out_features", None)
    return int(head) if head else int(states.logits(0, 1).shape[-1])


def ce(states: AnswerStates) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens: ``losses.answer_ce`` without the (B, T, V) logits."""
    parts = _chunks(states, lambda lo, hi, t: F.cross_entropy(states.logits(lo, hi), t, reduction="sum"),
                    states.targets, vocab=vocab_size(states))
    return torch.stack(parts).sum() / states.n


def sequence_logprob(states: AnswerStates) -> torch.Tensor:
    """log π(y|x) per row, the SUM of answer-token log-probs, (B,): ``losses.sequence_logprob`` chunked."""
    parts = _chunks(states, lambda lo, hi, t: -F.cross_entropy(states.logits(lo, hi), t, reduction="none"),
                    states.targets, vocab=vocab_size(states))
    lp = torch.cat(parts)
    return torch.zeros(states.batch_size, dtype=lp.dtype, device=lp.device).index_add(0, states.rows, lp)


def answer_token_counts(states: AnswerStates) -> torch.Tensor:
    """Answer tokens per row, (B,)."""
    return torch.bincount(states.rows, minlength=states.batch_size)


def kl(
    ref: AnswerStates,
    states: AnswerStates,
    keep: torch.Tensor | None = None,
    vocab_drop: Iterable[int] = (),
    renormalise: bool = False,
) -> torch.Tensor:
    """Mean over kept answer positions of KL(p_ref ‖ p_θ) with optional vocabulary drop: ``kl_to_reference``
    (no masks) and ``dmk_loss`` (SIU's two masks) of ``losses.py``, chunked.

    keep: (B, T−1) bool aligned with the shifted labels (SIU's token mask), or None for every answer position.
    An empty set of kept positions gives 0.
    """
    if ref.n != states.n or not torch.equal(ref.index, states.index):
        raise DataError("reference and model answer positions differ; they must come from the same batch")
    vocab = vocab_size(states)
    kept = torch.ones(states.n, dtype=torch.bool, device=states.hidden.device)
    if keep is not None:
        if keep.dim() != 2 or keep.shape[0] != states.batch_size:
            raise DataError(f"KL token mask must be (B, T-1), got {tuple(keep.shape)}")
        kept = keep.to(kept.device).reshape(-1)[states.index.to(kept.device)]
    drop = sorted(set(vocab_drop))

    def part(lo: int, hi: int, k: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            r = ref.logits(lo, hi)
        return (kl_rows(r, states.logits(lo, hi), drop, renormalise) * k).sum()

    total = torch.stack(_chunks(states, part, kept, vocab=vocab)).sum()
    return total / kept.sum().clamp(min=1)
