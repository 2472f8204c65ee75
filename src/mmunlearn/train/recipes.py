"""Training recipes per method and model scale: the papers' settings for real checkpoints, the tuned ones for
the built-in tiny model.

A recipe fills only the fields a run leaves unset (``UnlearnConfig.resolved``). The tiny model's recipe is each
method's own ``defaults`` (tuned on the built-in benchmark: learning rates around 1e-3, which would wreck a 7B
checkpoint); real checkpoints get the published settings:

* SIU on LLaVA-1.5 (Li et al. 2024, released training script): LoRA r=128, α=256, dropout 0.05 on the LM's
  q/k/v/o/gate/up/down, projector fully trained at lr 2e-5, vision encoder frozen; AdamW lr 3e-4, cosine,
  warm-up 0.03, 2 epochs, batch 4. Qwen2-VL takes the same recipe on its own LM projections.
* MMUnlearner (Huo et al. 2025) and the MLLMU-Bench baselines (GA, GA+KL, GA_Diff, KL_Min, NPO, PO): lr 1e-5,
  batch 4, 1 epoch; MMUnlearner full-parameter.

Which applies (``recipe: auto``): the tiny recipe below ``TINY_BELOW`` parameters — no published MLLM is that
small — and the paper recipe from there on; ``recipe: tiny`` or ``recipe: paper`` forces one.
"""

from __future__ import annotations

from typing import Any

from mmunlearn.errors import ConfigError
from mmunlearn.models.base import ModelAdapter

TINY_BELOW = 100_000_000
NAMES = ("auto", "tiny", "paper")
BASELINE = {"epochs": 1.0, "lr": 1e-5, "batch_size": 4, "scheduler": "constant", "group_lr": {}}

PAPER: dict[str, dict[str, Any]] = {
    "siu": {
        "epochs": 2.0, "lr": 3e-4, "batch_size": 4, "scheduler": "cosine", "warmup_ratio": 0.03,
        "trainable": ("projector", "language"), "group_lr": {"projector": 2e-5},
        "lora": {"r": 128, "alpha": 256, "dropout": 0.05, "groups": ("language",), "target_modules": "lm"},
    },
    "mmunlearner": {**BASELINE, "full_parameter": True},
    **{m: dict(BASELINE) for m in ("ga", "ga_kl", "ga_diff", "kl_min", "npo", "po")},
}


def choose(name: str, adapter: ModelAdapter) -> str:
    """``tiny`` or ``paper`` for a run's ``recipe`` option on this model."""
    if name not in NAMES:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(NAMES)}")
    if name != "auto":
        return name
    return "tiny" if adapter.num_parameters() < TINY_BELOW else "paper"


def recipe(method: str, defaults: dict[str, Any], which: str, adapter: ModelAdapter) -> dict[str, Any]:
    """The settings of ``which`` recipe for ``method``; LoRA targets ``"lm"`` become the family's own LM
    projection names (family knowledge stays in the adapter)."""
    if which == "tiny":
        return dict(defaults)
    if method not in PAPER:  # a method registered outside the built-in set keeps its own defaults
        return dict(defaults)
    out = dict(PAPER[method])
    if "lora" in out:
        lora = dict(out["lora"])
        if lora.get("target_modules") == "lm":
            lora["target_modules"] = list(adapter.lm_lora_targets)
        out["lora"] = lora
    return out
