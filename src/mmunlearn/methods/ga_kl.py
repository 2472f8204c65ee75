"""GA+KL: gradient ascent on the forget set plus KL to the vanilla model on the same forget inputs.

loss = −CE(forget) + w · KL(p_ref ‖ p_θ) on the forget inputs (image included), the baseline of SIU's
tables (Li et al. 2024). The released SIU code computed this KL on the text-only prompt by accident; here the
KL sees exactly what the CE sees, image included.
"""

from __future__ import annotations

import torch

from mmunlearn.methods.base import (
    Batches,
    Context,
    KLWeightOptions,
    Method,
    forward_logits,
    labels_of,
    reference_logits,
    register,
)
from mmunlearn.methods.losses import answer_ce, kl_to_reference


@register("ga_kl")
class GradientAscentKL(Method):
    Options = KLWeightOptions
    needs_reference = True
    defaults = {"steps": 10, "lr": 5e-4, "batch_size": 8}

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        b = batches.forget
        logits, labels = forward_logits(ctx.adapter, b), labels_of(ctx.adapter, b)
        ce = answer_ce(logits, labels)
        kl = kl_to_reference(reference_logits(ctx, b), logits, labels)
        return -ce + self.opt.kl_weight * kl, {"forget_ce": float(ce.detach()), "forget_kl": float(kl.detach())}
