"""KL_Min: gradient ascent on the forget set plus KL to the vanilla model on the retain set.

loss = −CE(forget) + w · KL(p_ref ‖ p_θ) on retain inputs, the KL taken over the vocabulary at each answer
position and averaged over positions (TOFU's "KL minimisation", Maini et al. 2024; a baseline of
MLLMU-Bench and MMUnlearner).
"""

from __future__ import annotations

import torch

from mmunlearn.methods import answer_states as AS
from mmunlearn.methods.base import (
    Batches,
    Context,
    KLWeightOptions,
    Method,
    batch_ce,
    batch_states,
    reference_states,
    register,
)


@register("kl_min")
class KLMinimisation(Method):
    Options = KLWeightOptions
    uses_retain = True
    reference = "logits"
    defaults = {"steps": 10, "lr": 5e-4, "batch_size": 8}

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        a = ctx.adapter
        ce = batch_ce(a, batches.forget)
        r = batches.retain
        kl = AS.kl(reference_states(ctx, r), batch_states(a, r))
        return -ce + self.opt.kl_weight * kl, {"forget_ce": float(ce.detach()), "retain_kl": float(kl.detach())}
