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


# Vanilla fine-tuning per model family, where the FinetuneConfig defaults (tuned for the tiny model trained from
# scratch: lr 5e-4, augmented images, an identity warm-up of a random vision tower) do not apply. The smol model
# arrives with a pretrained encoder (no warm-up) and LM, and a new projector: a projector-only alignment first,
# then everything at the learning rates used to fine-tune small pretrained models, on the images as they are (no
# augmentation: its documented recipe). The encoder trains at 1e-4: kept frozen, its
# ImageNet features told the benchmark's drawn people apart on only 75-83 % of the VQA questions (docs/smol.md).
# The length is an early stop, not a fixed count: the text-only facts are learnt within about two epochs, but
# naming the people on their images arrives abruptly (exact training answers at 0.2-0.45 for about three
# epochs, then 0.8-0.9 within one or two more), and when depends on the float summation order (threads, dtype),
# so a fixed count either stops before it or pays for epochs after it. 0.8 exact training answers already gave
# 100 % multiple choice on every split (docs/smol.md); higher learning rates did not bring the step sooner. The
# check scores 64 training examples of each kind (the default 256 is every example here: each check then took
# about 20 s, a sixth of an epoch's training on 2 threads).
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "smol": {
        "vision_warmup_steps": 0, "align_steps": 40, "align_lr": 1e-3,
        "trainable": ("vision", "projector", "language"), "lr": 1e-4, "group_lr": {"projector": 1e-3, "vision": 1e-4},
        "batch_size": 8, "epochs": 8.0, "warmup_steps": 10, "oversample_text": 1, "log_every": 10,
        "stop_accuracy": 0.8, "stop_every": 1.0, "stop_sample": 64, "augment_images": False,
    },
}


def finetune_preset(model: str, family: str | None = None) -> dict[str, Any]:
    """The fine-tuning preset of a model (``smol``, or a directory of that family); {} for the others."""
    from pathlib import Path

    if family is None and Path(model).is_dir():
        from mmunlearn.models import family_of

        family = family_of(model)
    name = family or model
    preset = FINETUNE_PRESETS.get(name, {})
    return {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v) for k, v in preset.items()}
