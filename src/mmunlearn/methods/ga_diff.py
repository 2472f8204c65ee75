"""GA_Diff ("gradient difference", Liu et al. 2022; a baseline of TOFU, MLLMU-Bench and MMUnlearner).

loss = −w_f · CE(forget) + w_r · CE(retain)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmunlearn.errors import ConfigError
from mmunlearn.methods.base import Batches, Context, Method, batch_ce, register


@dataclass
class GADiffOptions:
    forget_weight: float = 1.0
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.forget_weight < 0 or self.retain_weight < 0:
            raise ConfigError("ga_diff options forget_weight and retain_weight must be >= 0")


@register("ga_diff")
class GradientDifference(Method):
    Options = GADiffOptions
    uses_retain = True
    defaults = {"steps": 10, "lr": 5e-4, "batch_size": 8}

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        a = ctx.adapter
        f = batch_ce(a, batches.forget)
        r = batch_ce(a, batches.retain)
        loss = -self.opt.forget_weight * f + self.opt.retain_weight * r
        return loss, {"forget_ce": float(f.detach()), "retain_ce": float(r.detach())}
