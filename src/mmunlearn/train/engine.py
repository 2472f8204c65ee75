"""The one training engine: vanilla fine-tuning and every unlearning method run through ``Engine.step``.

A step is a closure that returns ``(loss, logs)``; the engine does backward, clipping, an optional
per-parameter update mask, the optimizer and the schedule. Mask modes:

* ``"update"`` (default): entries outside the mask do not move at all in that step — the parameter values
  *and* AdamW's moment estimates are restored after ``optimizer.step()``, and parameters absent from the
  mask are frozen for the step. This is a true constraint even with a shared optimizer.
* ``"gradient"``: the released MMUnlearner behaviour — gradients are multiplied by the mask, parameters absent
  from the mask keep their full gradient, and optimizer momentum can still move masked entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from mmunlearn.errors import ConfigError, ModelError, NonFiniteError
from mmunlearn.models.base import ModelAdapter

GROUPS = ("vision", "projector", "language")
StepFn = Callable[[], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoraOptions:
    """LoRA on the linear layers of the trainable groups (peft)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # default: every nn.Linear inside the trainable groups


@dataclass
class OptimConfig:
    lr: float = 1e-3
    group_lr: dict[str, float] = field(default_factory=dict)  # per-group learning rate overrides
    weight_decay: float = 0.0
    scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    max_steps: int = 100
    grad_clip: float = 1.0
    trainable: tuple[str, ...] = GROUPS
    lora: LoraOptions | None = None
    mask_mode: str = "update"
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: "stop" the run, or "skip" the step

    def __post_init__(self) -> None:
        bad = [g for g in (*self.trainable, *self.group_lr) if g not in GROUPS]
        if bad:
            raise ConfigError(f"unknown parameter group(s) {bad}; choose from {GROUPS}")
        if not self.trainable:
            raise ConfigError("trainable must name at least one parameter group")
        if self.mask_mode not in ("update", "gradient"):
            raise ConfigError(f"mask_mode must be 'update' or 'gradient', got {self.mask_mode!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.lr <= 0 or self.max_steps < 1:
            raise ConfigError("lr must be > 0 and max_steps >= 1")


def linear_module_names(adapter: ModelAdapter, groups: tuple[str, ...]) -> list[str]:
    """Every nn.Linear inside the groups, except the output head (LoRA on it is unusual and not merge-safe)."""
    return [
        n for n, m in adapter.model.named_modules()
        if isinstance(m, torch.nn.Linear) and adapter.group_of(n + ".weight") in groups and not n.endswith("lm_head")
    ]


class Engine:
    def __init__(self, adapter: ModelAdapter, cfg: OptimConfig, seed: int = 0) -> None:
        self.adapter, self.cfg = adapter, cfg
        torch.manual_seed(seed)
        # the model trains where the caller placed it, next to any frozen reference the method keeps
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), device_placement=False)
        model = adapter.model
        if cfg.lora is not None:
            model = self._wrap_lora(adapter, cfg)
        self.model = model
        param_groups, self.param_group_of = self._param_groups()
        self.optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(
            cfg.scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.adapter.model = self.model
        self.model.train()
        self.global_step = 0

    def _wrap_lora(self, adapter: ModelAdapter, cfg: OptimConfig) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        lo = cfg.lora
        targets = lo.target_modules or linear_module_names(adapter, cfg.trainable)
        if not targets:
            raise ConfigError(f"no linear layers to put LoRA on in groups {cfg.trainable}")
        peft_cfg = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=targets)
        return get_peft_model(adapter.model, peft_cfg)

    def _param_groups(self) -> tuple[list[dict], dict[str, str]]:
        by_group: dict[str, list[torch.nn.Parameter]] = {g: [] for g in GROUPS}
        group_of: dict[str, str] = {}
        for name, p in self.model.named_parameters():
            base = self.base_name(name)
            g = self.adapter.group_of(base)
            trainable = g in self.cfg.trainable and (self.cfg.lora is None or "lora_" in name)
            p.requires_grad_(trainable)
            if trainable:
                by_group[g].append(p)
                group_of[name] = g
        groups = [
            {"params": ps, "lr": self.cfg.group_lr.get(g, self.cfg.lr), "name": g} for g, ps in by_group.items() if ps
        ]
        if not groups:
            raise ConfigError(f"no trainable parameters in groups {self.cfg.trainable}")
        return groups, group_of

    @staticmethod
    def base_name(name: str) -> str:
        """Parameter name without peft's wrapping prefixes, as the adapter's group prefixes expect."""
        for pre in ("base_model.model.",):
            if name.startswith(pre):
                name = name[len(pre) :]
        return name.replace(".base_layer", "")

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def step(self, fn: StepFn, mask: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimisation step; ``mask`` maps parameter names to bool tensors of entries allowed to move."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.accelerator.autocast():
            loss, logs = fn()
        self.accelerator.backward(loss)
        if mask is not None and self.cfg.mask_mode == "gradient":
            for n, p in self.trainable_parameters().items():
                if n in mask and p.grad is not None:
                    p.grad.mul_(mask[n].to(p.grad.dtype))
        if self.cfg.grad_clip:
            gn = self.accelerator.clip_grad_norm_(list(self.trainable_parameters().values()), self.cfg.grad_clip)
            logs["grad_norm"] = float(gn)
        if not self.finite_step(loss, logs):
            return logs
        if mask is not None and self.cfg.mask_mode == "update":
            self._masked_update(mask)
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        logs["loss"] = float(loss.detach())
        logs["lr"] = self.scheduler.get_last_lr()[0]
        return logs

    def _masked_update(self, mask: dict[str, torch.Tensor]) -> None:
        """optimizer.step(), then put back every entry outside the mask: its value and its AdamW moments.

        Parameters absent from the mask are frozen for the step. (AdamW's scalar step count still advances.)
        """
        saved = []
        for n, p in self.trainable_parameters().items():
            keep = ~mask[n].to(p.device) if n in mask else torch.ones_like(p, dtype=torch.bool)
            state = self.optimizer.state.get(p, {})
            moments = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in state}
            saved.append((p, keep, p.detach().clone(), moments))
        self.optimizer.step()
        with torch.no_grad():
            for p, keep, old, moments in saved:
                p[keep] = old[keep]
                state = self.optimizer.state[p]
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in state:
                        state[k][keep] = moments[k][keep] if k in moments else 0.0

    # ---- numerical guard and resumable state ------------------------------------------------------------
    last_finite: tuple[int, float] | None = None  # (step, loss) of the last step with a finite loss
    skipped: tuple[int, ...] = ()  # steps skipped for a non-finite loss or gradient norm (on_nonfinite: skip)

    def finite_step(self, loss: torch.Tensor, logs: dict[str, float]) -> bool:
        """Check the loss and gradient norm before the optimizer moves anything.

        Finite: True. Otherwise NonFiniteError naming the step and the last finite loss, or, with
        ``on_nonfinite: skip``, the step is dropped (no update; the schedule advances) and False is returned.
        """
        value = float(loss.detach())
        gn = logs.get("grad_norm")
        if gn is None:
            grads = [p.grad.detach().float().norm() for p in self.trainable_parameters().values() if p.grad is not None]
            gn = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        if math.isfinite(value) and math.isfinite(gn):
            self.last_finite = (self.global_step, value)
            return True
        what = f"loss ({value})" if not math.isfinite(value) else f"gradient norm ({gn})"
        if self.cfg.on_nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped = (*self.skipped, self.global_step)
            self.scheduler.step()
            self.global_step += 1
            logs.update(loss=value, lr=self.scheduler.get_last_lr()[0], skipped=1.0)
            return False
        last = ("no finite loss before it" if self.last_finite is None
                else f"last finite loss {self.last_finite[1]:.6g} at step {self.last_finite[0]}")
        raise NonFiniteError(
            f"non-finite {what} at step {self.global_step}; {last}; nothing was saved "
            "(lower lr, or set on_nonfinite=skip to skip such steps)"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the engine: trainable weights (CPU copies), optimizer, schedule, step."""
        return {
            "model": {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.trainable_parameters().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_step": self.global_step,
            "skipped": list(self.skipped),
            "last_finite": list(self.last_finite) if self.last_finite else None,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        params = self.trainable_parameters()
        if set(d["model"]) != set(params):
            extra = sorted(set(d["model"]) ^ set(params))
            raise ModelError(f"checkpoint trains other parameters than this run, e.g. {extra[0]!r}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(d["model"][n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])
        self.global_step = int(d["global_step"])
        self.skipped = tuple(int(i) for i in d.get("skipped", ()))
        last = d.get("last_finite")
        self.last_finite = (int(last[0]), float(last[1])) if last else None
