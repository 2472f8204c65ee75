"""GA+KL: gradient ascent on the forget set plus KL to the vanilla model on the same forget inputs.

loss = −CE(forget) + w · KL(p_ref ‖ p_θ) on the forget inputs (image included), the baseline of SIU's
tables (Li et al. 2024). The released SIU code computed this KL on the text-only prompt by accident; here the
KL sees exactly what the CE sees, image included.

``legacy_text_only`` (set by ``paper_exact``) reproduces the released baseline trainer instead: both models run
without the image (its placeholder collapsed to one token and replaced by id 0, as ``input_ids[input_ids < 0]
= 0`` did), and loss = ``losses.released_reference_ce`` − CE of that text-only pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmunlearn.errors import ConfigError
from mmunlearn.methods import answer_states as AS
from mmunlearn.methods.base import (
    Batch,
    Batches,
    Context,
    Method,
    batch_states,
    forward_logits,
    labels_of,
    reference_states,
    register,
)
from mmunlearn.methods.losses import answer_ce, released_reference_ce
from mmunlearn.models.base import IGNORE, ModelAdapter


@dataclass
class GAKLOptions:
    """kl_weight: weight of the KL term; legacy_text_only: the released baseline's loss (module docstring)."""

    kl_weight: float = 1.0
    legacy_text_only: bool = False

    def __post_init__(self) -> None:
        if self.kl_weight < 0:
            raise ConfigError(f"option kl_weight must be >= 0, got {self.kl_weight}")


@register("ga_kl")
class GradientAscentKL(Method):
    Options = GAKLOptions
    reference = "logits"
    defaults = {"steps": 10, "lr": 5e-4, "batch_size": 8}
    paper_exact = {"legacy_text_only": True}

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        b = batches.forget
        if self.opt.legacy_text_only:  # every position of a text-only pass: full logits, reproduction only
            b = released_text_batch(ctx.adapter, b)
            logits = forward_logits(ctx.adapter, b)
            ce = answer_ce(logits, labels_of(ctx.adapter, b))
            kl = released_reference_ce(ctx.reference.full_logits(b), logits)
        else:
            states = batch_states(ctx.adapter, b)
            ce = AS.ce(states)
            kl = AS.kl(reference_states(ctx, b), states)
        return -ce + self.opt.kl_weight * kl, {"forget_ce": float(ce.detach()), "forget_kl": float(kl.detach())}


def released_text_batch(adapter: ModelAdapter, batch: Batch) -> Batch:
    """The batch as the released baseline fed it: no image inputs, each run of image tokens collapsed to one
    token with id 0 (attended, labelled -100), rows right-padded again."""
    image_id = getattr(adapter.model.config, "image_token_id", None)
    pad = adapter.tokenizer.pad_token_id
    rows: list[tuple[list[int], list[int]]] = []
    for ids, att, lab in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()):
        toks, labs = [], []
        previous_image = False
        for t, a, y in zip(ids, att, lab):
            if not a or (t == image_id and previous_image):
                continue
            previous_image = t == image_id
            toks.append(0 if previous_image else t)
            labs.append(IGNORE if previous_image else y)
        rows.append((toks, labs))
    width = max(len(t) for t, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (toks, labs) in enumerate(rows):
        input_ids[i, : len(toks)] = torch.tensor(toks)
        attention[i, : len(toks)] = 1
        labels[i, : len(labs)] = torch.tensor(labs)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
