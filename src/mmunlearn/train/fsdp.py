"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and AdamW state sharded over ranks.

What a 13B full-parameter run needs (≈16 B per parameter of weights, gradients, fp32 masters and moments do not
fit one 80 GB GPU). Each block class the adapter declares (``ModelAdapter.block_classes``: LLaVA's
LlamaDecoderLayer and CLIPEncoderLayer, Qwen2-VL's decoder layers and vision blocks) becomes one FSDP unit that
is gathered just before its forward and freed after; the backbone (embeddings, projector, norms) and the LM
head are units of their own, because the answer-position losses call them separately
(``methods/answer_states.py``), not through the top-level forward.

Every rank must gather the same units in the same order, so a rank whose micro-batch has no image still runs
the vision tower on a blank image, contributing zero (``ModelAdapter.touch_vision``; the known fix for mixed
text-only / image batches under FSDP and DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import torch

from mmunlearn.errors import ConfigError
from mmunlearn.models.base import ModelAdapter


def shard(adapter: ModelAdapter, reshard_after_forward: bool = True) -> int:
    """``fully_shard`` every block of the adapter's ``block_classes``, then the backbone and the LM head, in
    place; returns the number of blocks. Needs an initialised process group (``accelerate launch``)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("FSDP needs several processes: start the command with accelerate launch")
    classes = set(adapter.block_classes)
    if not classes:
        raise ConfigError(f"family {adapter.family!r} declares no block classes to shard (block_classes)")
    model = adapter.unwrapped()
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if not blocks:
        raise ConfigError(f"no module of classes {sorted(classes)} in the model; FSDP has nothing to wrap")
    for m in blocks:
        fully_shard(m, reshard_after_forward=reshard_after_forward)
    body, head = adapter.backbone_and_head()
    fully_shard(body, reshard_after_forward=reshard_after_forward)
    fully_shard(head, reshard_after_forward=reshard_after_forward)
    adapter.touch_vision = True
    return len(blocks)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


@torch.no_grad()
def full_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter (or every tensor of ``tensors``, e.g. a state dict) whole, on the CPU: sharded ones are
    gathered from all ranks, so every rank must call it."""
    items = dict(model.named_parameters()) if tensors is None else tensors
    out = {}
    for n, t in items.items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[n] = t.detach().to("cpu", copy=True)
    return out
