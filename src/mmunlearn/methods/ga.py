"""GA: gradient ascent on the forget set (Thudi et al. 2022; the basic baseline of TOFU and MLLMU-Bench).

loss = −CE(forget)
"""

from __future__ import annotations

import torch

from mmunlearn.methods.base import Batches, Context, Method, batch_ce, register


@register("ga")
class GradientAscent(Method):
    defaults = {"steps": 10, "lr": 5e-4, "batch_size": 8}

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        ce = batch_ce(ctx.adapter, batches.forget)
        return -ce, {"forget_ce": float(ce.detach())}
