"""Batched model scoring shared by every protocol: answer log-likelihoods and option ranking."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmunlearn.data.batches import ImageCache
from mmunlearn.data.schema import Example
from mmunlearn.models.base import IGNORE, Item, ModelAdapter


def token_logprobs(adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of each label token, and the mask of answer positions. Shapes (B, T-1)."""
    batch = adapter.to_device(batch)
    labels = batch.pop("labels")
    batch.pop("answer_start", None)
    logits = adapter.model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


@torch.no_grad()
def answer_logprobs(adapter: ModelAdapter, items: Sequence[Item], batch_size: int = 32) -> list[list[float]]:
    """Log-prob of every answer token (teacher forcing), per item."""
    out: list[list[float]] = []
    for i in range(0, len(items), batch_size):
        lp, mask = token_logprobs(adapter, adapter.encode(list(items[i : i + batch_size])))
        out += [row[m].tolist() for row, m in zip(lp.cpu(), mask.cpu())]
    return out


@torch.no_grad()
def rank_options(
    adapter: ModelAdapter, examples: Sequence[Example], images: ImageCache, batch_size: int = 64
) -> list[int]:
    """Multiple choice by log-likelihood: the option whose text has the highest summed log-prob as the answer."""
    items, owners = [], []
    for k, e in enumerate(examples):
        img = images.get(e)
        for opt in e.options or []:
            items.append(Item(e.prompt, opt, img))
            owners.append(k)
    scores = [sum(t) for t in answer_logprobs(adapter, items, batch_size)]
    best: dict[int, tuple[float, int]] = {}
    pos: dict[int, int] = {}
    for owner, s in zip(owners, scores):
        j = pos.get(owner, 0)
        pos[owner] = j + 1
        if owner not in best or s > best[owner][0]:
            best[owner] = (s, j)
    return [best[k][1] for k in range(len(examples))]
