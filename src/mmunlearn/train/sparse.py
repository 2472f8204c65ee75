"""Training only the masked entries: optimizer state for the entries that can move, none for the rest.

Dense full-parameter AdamW keeps ~16 B per parameter (bf16 weight and gradient, fp32 master and two moments):
113 GB for LLaVA-1.5-7B, more than one 80 GB GPU. MMUnlearner's saliency mask selects a fraction ρ of the
LM's linear-weight entries; only those need state. Here each masked weight W (any dtype) stays the live
tensor the model computes with, and the trainable values are

    W = W_base outside the mask,   W[mask] = master (fp32, one value per selected entry),

with the master updated by an ordinary ``torch.optim.AdamW`` (its moments the size of the selection). The
dense gradient of W exists only transiently: a post-accumulate hook moves its selected entries into the
master's gradient and frees it as soon as backward has produced it. Per selected entry: 4 B master + 8 B
moments + 4 B gradient; per weight entry: the bf16 weight (2 B) and the packed mask (1 bit). At ρ = 0.5 of
LLaVA-1.5-7B's LM linear weights that is about 67 GB before activations (``bench/scale.py --accounting``).

Everything else (unmasked weights, biases, norms, embeddings, the vision tower unless masked) is frozen. This
is what "the mask is a true constraint" means when every step, the retain steps included, may only update the
masked entries: the retain step repairs the forget step's damage where the forget step made it.
"""

from __future__ import annotations

import torch

from mmunlearn.train.masks import PackedMask, chunk_entries


class SparseEntries:
    """The selected entries of one weight: packed mask, per-chunk offsets into the fp32 master."""

    def __init__(self, weight: torch.nn.Parameter, mask: PackedMask, chunk: int) -> None:
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask shape {mask.shape} does not match the weight's {tuple(weight.shape)}")
        self.weight, self.mask, self.chunk = weight, mask.to(weight.device), chunk
        self.bounds: list[tuple[int, int, int, int]] = []  # (lo, hi, offset, count) per chunk with entries
        offset = 0
        for lo in range(0, weight.numel(), chunk):
            hi = min(weight.numel(), lo + chunk)
            n = int(self.mask.slice(lo, hi).sum())
            if n:
                self.bounds.append((lo, hi, offset, n))
                offset += n
        flat = weight.detach().view(-1)
        self.master = torch.empty(offset, dtype=torch.float32, device=weight.device)
        for lo, hi, off, n in self.bounds:
            self.master[off : off + n] = flat[lo:hi][self.mask.slice(lo, hi)].float()
        self.master.requires_grad_(True)

    @property
    def count(self) -> int:
        return int(self.master.numel())

    @torch.no_grad()
    def take_grad(self) -> None:
        """Selected entries of the dense gradient into the master's gradient; the dense one is freed."""
        g = self.weight.grad
        if g is None:
            return
        if self.master.grad is None:
            self.master.grad = torch.zeros_like(self.master)
        flat = g.view(-1)
        for lo, hi, off, n in self.bounds:
            self.master.grad[off : off + n] += flat[lo:hi][self.mask.slice(lo, hi)].float()
        self.weight.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """W[mask] ← master (rounded to W's dtype)."""
        flat = self.weight.data.view(-1)
        for lo, hi, off, n in self.bounds:
            flat[lo:hi].masked_scatter_(self.mask.slice(lo, hi), self.master[off : off + n].to(flat.dtype))


class SparseTrainer:
    """The masked entries of several weights as the only trainable state of a model."""

    def __init__(self, model: torch.nn.Module, masks: dict[torch.nn.Parameter, PackedMask]) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        total = sum(p.numel() for p in masks)
        chunk = chunk_entries(total)
        self.entries = [SparseEntries(p, m, chunk) for p, m in masks.items()]
        self._hooks = []
        for e in self.entries:
            e.weight.requires_grad_(True)
            self._hooks.append(e.weight.register_post_accumulate_grad_hook(lambda _p, e=e: e.take_grad()))

    def masters(self) -> list[torch.Tensor]:
        return [e.master for e in self.entries]

    def write_back(self) -> None:
        for e in self.entries:
            e.write_back()

    def selected(self) -> int:
        return sum(e.count for e in self.entries)

    def state_bytes(self) -> int:
        """Bytes of trainable state beyond the model: masters, their gradients, AdamW's two moments, masks."""
        return sum(16 * e.count + e.mask.bits.numel() for e in self.entries)
