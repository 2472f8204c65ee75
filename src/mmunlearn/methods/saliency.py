"""Parameter saliency for MMUnlearner (Huo et al. 2025, "MMUnlearner: Reformulating Multimodal Machine
Unlearning in the Era of Multimodal Large Language Models", §3 "geometry-constrained gradient ascent").

Importance of each parameter entry for a data set D: F_D(θ) = mean over batches b of (∂CE_b/∂θ)², accumulated
in float32 whatever the model dtype (the released code accumulated in the model dtype, where the 1e-15
epsilon and small squares underflow in fp16). Mask: M = 1[(F_forget + ε) / (F_preserve + ε) ≥ γ].
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmunlearn import distributed as D
from mmunlearn.errors import ConfigError
from mmunlearn.methods.base import Batch, batch_ce
from mmunlearn.models.base import ModelAdapter
from mmunlearn.train.masks import PackedMask

LINEAR_KEYS = ("proj", "fc", "linear", "mlp", "qkv")
GAMMA, EPS = 1.0, 1e-15
PACKED = "packed-bits shapes"  # metadata key of mask files at 1 bit per entry


def maskable(name: str, p: torch.Tensor) -> bool:
    """Only linear-layer weights carry a mask: 2-D ``.weight`` tensors whose name says proj/fc/linear/mlp/qkv."""
    return p.dim() == 2 and name.endswith(".weight") and any(k in name for k in LINEAR_KEYS)


def official_maskable(name: str) -> bool:
    """The released training script's filter: a mask is kept for every parameter whose name contains
    proj / fc / linear / mlp / qkv, whatever its shape (biases and norms inside such modules included)."""
    return any(k in name for k in LINEAR_KEYS)


def importance(
    adapter: ModelAdapter, batches: Iterable[Batch], names: list[str], progress: bool = False, desc: str = "",
    official_batches: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """F_D for the named parameters (fp32, on their device) over ``batches``; also the number of batches.

    Gradients flow only into ``names`` during the pass; every parameter's ``requires_grad`` is restored after.
    On a GPU the finished scores move to host memory, so that only the one set being scored holds an fp32
    copy on the device (the mask is then computed on the host and packed to 1 bit per entry).
    With several processes ``batches`` is this rank's share (``distributed.my_batches``): the sums of squares
    and the batch count are added over the ranks, so every rank gets the scores of all batches.
    ``official_batches`` = n runs the released loop instead (``data_process/SFRon.py``): the model in train
    mode (dropout on) and F += grad² / n accumulated in the parameter's own dtype.
    """
    model = adapter.model
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"importance: unknown parameter(s) {missing[:3]}")
    saved = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    official = official_batches is not None
    model.train(official)
    acc = {n: torch.zeros_like(params[n], dtype=params[n].dtype if official else torch.float32) for n in names}
    wanted = set(names)
    count = 0
    try:
        for n, p in params.items():
            p.requires_grad_(n in wanted)
        for batch in tqdm(batches, desc=desc or "importance", disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            loss = batch_ce(adapter, batch)
            count += 1
            if not loss.requires_grad:  # none of ``names`` is on this batch's path (e.g. vision, text-only)
                continue
            loss.backward()
            for n in names:
                g = params[n].grad
                if g is not None and official:
                    acc[n] += g.square() / official_batches
                elif g is not None:
                    acc[n] += g.float().square()
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(saved[n])
        model.train(was_training)
    if D.world() > 1:  # each rank scored its share of the batches: sums and counts over the ranks
        D.sum_tensors(acc)
        count = sum(D.gather_objects(count))
    if count == 0:
        raise ConfigError(f"importance ({desc}): no batches to score")
    offload = any(a.is_cuda for a in acc.values())
    if official:
        return ({n: a.cpu() for n, a in acc.items()} if offload else acc), count
    return {n: (a / count).cpu() if offload else a / count for n, a in acc.items()}, count


def combine(parts: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Importance over the union of several data sets: the batch-weighted mean of their per-set means."""
    total = sum(k for _, k in parts)
    names = parts[0][0].keys()
    return {n: sum(f[n] * k for f, k in parts) / total for n in names}


def saliency_mask(
    f_forget: dict[str, torch.Tensor], f_preserve: dict[str, torch.Tensor], gamma: float = GAMMA, eps: float = EPS
) -> dict[str, torch.Tensor]:
    """M = 1[(F_forget + ε) / (F_preserve + ε) ≥ γ], entry-wise, for every parameter in ``f_forget``."""
    return {n: (f_forget[n] + eps) / (f_preserve[n] + eps) >= gamma for n in f_forget}


def mask_stats(masks: dict[str, PackedMask], group_of: dict[str, str]) -> dict:
    """Fraction of entries selected per group, per layer (``<group> layer <i>``) and per parameter."""
    groups: dict[str, list[int]] = {}
    layers: dict[str, list[int]] = {}
    per_param = {}
    for n, m in masks.items():
        sel, tot = m.count(), m.numel
        per_param[n] = round(sel / tot, 6)
        g = group_of[n]
        groups.setdefault(g, [0, 0])
        groups[g][0] += sel
        groups[g][1] += tot
        hit = re.search(r"layers\.(\d+)\.", n)
        key = f"{g} layer {hit.group(1)}" if hit else f"{g} other"
        layers.setdefault(key, [0, 0])
        layers[key][0] += sel
        layers[key][1] += tot
    frac = lambda d: {k: {"selected": s, "total": t, "fraction": round(s / t, 6)} for k, (s, t) in sorted(d.items())}
    return {"groups": frac(groups), "layers": frac(layers), "parameters": per_param}


def save_masks(masks: dict[str, PackedMask], path: str | Path) -> None:
    """1 bit per entry: each mask's packed bytes, with the shapes in the file's metadata."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    shapes = {n: list(m.shape) for n, m in masks.items()}
    # one metadata key: safetensors writes several in a random order, and identical runs must write identical files
    save_file({n: m.bits.cpu().contiguous() for n, m in masks.items()}, str(path),
              metadata={PACKED: json.dumps(shapes, sort_keys=True)})


def load_masks(path: str | Path) -> dict[str, PackedMask]:
    """Masks written by ``save_masks`` (or the earlier one-byte-per-entry files)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"mask file does not exist: {p} (option masks_path)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise ConfigError(f"{p}: not a mask file ({e})") from e
    if PACKED not in meta:
        return {n: PackedMask.pack(t.bool()) for n, t in tensors.items()}
    shapes = json.loads(meta[PACKED])
    return {n: PackedMask(t, tuple(shapes[n])) for n, t in tensors.items()}
