"""DeepSpeed ZeRO-3 through accelerate (``accelerate launch --config_file configs/accelerate/zero3.yaml``).

Only used when accelerate's configuration selects DeepSpeed; ``deepspeed`` itself is imported by accelerate,
never here, so the package is optional (``pip install deepspeed``). Under ZeRO-3 DeepSpeed owns parameters,
gradients, fp32 masters and AdamW state (partitioned over the ranks), the gradient reduction, clipping
(``gradient_clipping`` in its config) and the optimizer step; the engine keeps the schedule, the micro-batch
split (``distributed.micro_slices``) and the numerical guard on the loss.

Not available there, and refused with a ConfigError: per-step update masks and trainable masks (MMUnlearner —
its masked AdamW works on whole weights and moments, which ZeRO-3 partitions; run it data parallel or with
FSDP off), and the frozen reference copy of GA+KL / KL_Min / SIU full-parameter runs (it would be a whole
unpartitioned copy per GPU: use their LoRA recipes, whose reference is the model with adapters disabled).
A rank whose micro-batch has no image runs the vision tower on a blank image (``ModelAdapter.touch_vision``),
or ZeRO-3's parameter gathers would wait for it forever.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch

from mmunlearn import distributed as D
from mmunlearn.errors import ConfigError, NonFiniteError

if TYPE_CHECKING:
    from mmunlearn.train.engine import Engine, StepFn


def requested() -> bool:
    """Whether accelerate's launch configuration selects DeepSpeed (set before any accelerate state exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and D.launched()


def check(trainable_masks: object, mask_mode_needs_whole_weights: bool = False) -> None:
    if trainable_masks is not None or mask_mode_needs_whole_weights:
        raise ConfigError("DeepSpeed ZeRO-3 partitions weights and AdamW state; trainable or per-step masks "
                          "(MMUnlearner) need them whole: run data parallel without the DeepSpeed config")


def prepare(engine: Engine) -> None:
    """Hand model and optimizer to DeepSpeed (through accelerate); the vision tower is touched on text batches."""
    plugin = engine.accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # no dataloader to infer it
        ds["train_micro_batch_size_per_gpu"] = engine.cfg.micro_batch
    if ds.get("train_batch_size", "auto") == "auto":  # DeepSpeed checks micro x accumulation x ranks
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * engine.cfg.gradient_accumulation * D.world()
    engine.model, engine.optimizer = engine.accelerator.prepare(engine.model, engine.optimizer)
    engine.adapter.model = engine.model
    engine.adapter.touch_vision = True


def step(engine: Engine, fns: list[StepFn]) -> dict[str, float]:
    """One optimisation step over this rank's micro-batches: DeepSpeed scales each loss by 1/accumulation,
    reduces and steps at the last one (accelerate's ``accumulate`` marks it)."""

    if engine.accelerator.gradient_accumulation_steps != len(fns):
        raise ConfigError(f"the DeepSpeed config accumulates {engine.accelerator.gradient_accumulation_steps} "
                          f"micro-batches, the run {len(fns)}: set deepspeed_config.gradient_accumulation_steps "
                          "to the run's gradient_accumulation")

    def run() -> tuple[list[float], list[dict[str, float]]]:
        losses, logs = [], []
        for f in fns:
            with engine.accelerator.accumulate(engine.model):
                loss, lg = f()
                value = float(loss.detach())
                if not math.isfinite(value) and engine.cfg.on_nonfinite == "stop":
                    raise NonFiniteError(f"non-finite loss ({value}) at step {engine.global_step}; nothing was saved")
                engine.accelerator.backward(loss)
                engine.optimizer.step()
                engine.optimizer.zero_grad()
            losses.append(value)
            logs.append(lg)
        return losses, logs

    losses, logs = D.agree(run)
    mean = {k: sum(lg[k] for lg in logs) / len(logs) for k in logs[0]}
    mean["loss"] = sum(losses) / len(losses)
    mean = D.mean_over_ranks(mean)
    norm = engine.model.get_global_grad_norm() if hasattr(engine.model, "get_global_grad_norm") else None
    if norm is not None:
        mean["grad_norm"] = float(norm.item() if isinstance(norm, torch.Tensor) else norm)
    engine.scheduler.step()
    engine.global_step += 1
    mean["lr"] = engine.scheduler.get_last_lr()[0]
    return mean


def full_state(engine_or_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole 16-bit weights for saving (every rank takes part; needs
    ``stage3_gather_16bit_weights_on_model_save: true`` in the DeepSpeed config, which accelerate's
    ``zero3_save_16bit_model: true`` sets). The DeepSpeed engine's own gather, as accelerate's
    ``get_state_dict`` does it (that needs the accelerator which prepared the model)."""
    if not engine_or_model.zero_gather_16bit_weights_on_model_save():
        raise ConfigError("saving a ZeRO-3 model needs zero3_save_16bit_model: true in the accelerate config "
                          "(stage3_gather_16bit_weights_on_model_save in DeepSpeed's)")
    return engine_or_model._zero3_consolidated_16bit_state_dict()
