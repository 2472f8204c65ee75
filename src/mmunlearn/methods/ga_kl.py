"""GA+KL: gradient ascent on the forget set plus KL to the vanilla model on the same forget inputs.

loss = −CE(forget) + w · KL(p_ref ‖ p_θ) on the forget inputs (image included), the baseline of SIU's
tables (Li et al. 2024). The released SIU code computed this KL on the text-only prompt by accident; here the
KL sees exactly what the CE sees, image included.
"""

from __future__ import annotations

import torch

from mmunlearn.methods import answer_states as AS
from mmunlearn.methods.base import (
    Batches,
    Context,
    KLWeightOptions,
    Method,
    batch_states,
    reference_states,
    register,
)


@register("ga_kl")
class GradientAscentKL(Method):
    Options = KLWeightOptions
    reference = "logits"
    defaults = {"steps": 10, "lr": 5e-4, "batch_size": 8}

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        b = batches.forget
        states = batch_states(ctx.adapter, b)
        ce = AS.ce(states)
        kl = AS.kl(reference_states(ctx, b), states)
        return -ce + self.opt.kl_weight * kl, {"forget_ce": float(ce.detach()), "forget_kl": float(kl.detach())}
