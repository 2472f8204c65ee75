"""NPO: negative preference optimisation on the forget set (Zhang et al. 2024), optionally with a retain CE.

loss = −(2/β) · E_forget[log σ(−β · (log π_θ(y|x) − log π_ref(y|x)))]  (+ w · CE(retain) with ``retain``:
NPO-RT). log π is the SUM of answer-token log-probabilities of a sequence, as NPO defines it; the released
MMUnlearner code used a batch-mean CE in its place (``legacy_mean_ce`` reproduces that). log π_ref needs no
reference model during training: it is precomputed once per forget sequence (``methods/reference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmunlearn.errors import ConfigError
from mmunlearn.methods import answer_states as AS
from mmunlearn.methods.base import Batches, Context, Method, batch_ce, batch_states, register
from mmunlearn.methods.losses import NPO_BETA, npo_loss


@dataclass
class NPOOptions:
    beta: float = NPO_BETA
    retain: bool = False  # NPO-RT: add w · CE(retain)
    retain_weight: float = 1.0
    legacy_mean_ce: bool = False  # log π := −(batch-mean CE), as the released MMUnlearner code did

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"npo option beta must be > 0, got {self.beta}")
        if self.retain_weight < 0:
            raise ConfigError(f"npo option retain_weight must be >= 0, got {self.retain_weight}")


@register("npo")
class NPO(Method):
    Options = NPOOptions
    reference = "sequence_logprobs"
    defaults = {"steps": 10, "lr": 5e-4, "batch_size": 8}
    paper_exact = {"legacy_mean_ce": True}

    @property
    def uses_retain(self) -> bool:  # type: ignore[override]
        return self.opt.retain

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        a = ctx.adapter
        states = batch_states(a, batches.forget)
        ref_sum, ref_n = ctx.reference.sequence_logprobs(batches.forget_examples)
        logp = AS.sequence_logprob(states)
        logp_ref = ref_sum.to(logp.device, logp.dtype)
        if self.opt.legacy_mean_ce:  # −(batch-mean CE) of both models
            logp, logp_ref = logp.sum() / states.n, logp_ref.sum() / ref_n.sum().to(logp.device)
            loss = -(2.0 / self.opt.beta) * F.logsigmoid(-self.opt.beta * (logp - logp_ref))
        else:
            loss = npo_loss(logp, logp_ref, self.opt.beta)
        logs = {"npo": float(loss.detach()), "forget_logratio": float((logp - logp_ref).mean().detach())}
        if self.opt.retain:
            r = batch_ce(a, batches.retain)
            loss = loss + self.opt.retain_weight * r
            logs["retain_ce"] = float(r.detach())
        return loss, logs
