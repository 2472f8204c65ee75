"""PO: "preference optimisation" as in SIU's tables — fine-tune the forget prompts towards refusals.

loss = CE(forget prompts → refusal answers) + w · CE(retain). Each forget example keeps its prompt (and
image) and gets one of several refusal phrasings, assigned in turn so every phrasing is used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from mmunlearn.errors import ConfigError
from mmunlearn.methods.base import Batches, Context, Method, batch_ce, register

REFUSALS = [
    "I don't know who this is.",
    "I'm not sure who this person is.",
    "I cannot tell who this is.",
    "Sorry, I don't recognise this person.",
    "I have no information about this person.",
]


@dataclass
class POOptions:
    refusals: list[str] = field(default_factory=lambda: list(REFUSALS))
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.refusals or not all(isinstance(r, str) and r.strip() for r in self.refusals):
            raise ConfigError("po option refusals must be a non-empty list of non-empty answers")
        if self.retain_weight < 0:
            raise ConfigError(f"po option retain_weight must be >= 0, got {self.retain_weight}")


@register("po")
class RefusalTuning(Method):
    Options = POOptions
    uses_retain = True
    defaults = {"steps": 10, "lr": 5e-4, "batch_size": 8}

    def prepare(self, ctx: Context) -> None:
        refusals = self.opt.refusals
        ctx.forget_data = [
            dataclasses.replace(e, id=f"{e.id}-refusal", answer=refusals[i % len(refusals)])
            for i, e in enumerate(ctx.forget_data)
        ]

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        a = ctx.adapter
        f = batch_ce(a, batches.forget)
        r = batch_ce(a, batches.retain)
        return f + self.opt.retain_weight * r, {"refusal_ce": float(f.detach()), "retain_ce": float(r.detach())}
