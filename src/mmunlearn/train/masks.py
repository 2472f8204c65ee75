"""Per-parameter update masks at 1 bit per entry, and an AdamW step that honours them in place.

A saliency mask selects entries of a weight that may move (MMUnlearner's forget step). Stored as bools it is
1 byte per entry (50 % of a bf16 weight); packed here it is 1 bit (6 %), kept on the parameter's device.

``masked_adamw_step`` is ``torch.optim.AdamW.step`` restricted to the masked entries: their values and both
moment estimates update exactly as AdamW would; every other entry, and every parameter without a mask, keeps
its value and its moments (its scalar step count still advances, as under a dense step). It works through
each parameter in contiguous chunks, so the only extra memory is a few chunk-sized temporaries — no clone of
parameters or moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


@dataclass
class PackedMask:
    """A boolean mask of ``shape`` packed 8 entries per byte (entry i is bit i % 8 of byte i // 8)."""

    bits: torch.Tensor  # (ceil(numel / 8),) uint8
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.bits.device

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        flat = mask.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        weights = (1 << _SHIFTS.to(flat.device)).to(torch.uint8)
        bits = (flat.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)
        return cls(bits, tuple(mask.shape))

    def slice(self, lo: int, hi: int) -> torch.Tensor:
        """Entries [lo, hi) of the flattened mask as a bool tensor (``lo`` a multiple of 8)."""
        if lo % 8:
            raise ValueError("PackedMask.slice needs lo to be a multiple of 8")
        byte = self.bits[lo // 8 : (hi + 7) // 8]
        out = (byte[:, None] >> _SHIFTS.to(byte.device)) & 1
        return out.reshape(-1)[: hi - lo].bool()

    def unpack(self) -> torch.Tensor:
        return self.slice(0, self.numel).reshape(self.shape)

    def to(self, device: torch.device | str) -> PackedMask:
        return PackedMask(self.bits.to(device), self.shape)

    def count(self) -> int:
        """Number of selected entries."""
        table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=self.bits.device)
        return int(table[self.bits.long()].sum())


def chunk_entries(total: int, parts: int = 128, minimum: int = 1 << 12) -> int:
    """Chunk length for ``masked_adamw_step``: about total/parts entries, a multiple of 8: the temporaries of
    a masked step stay near 4·(1/parts) of the trainable bytes whatever the model size."""
    c = max(minimum, -(-total // parts))
    return -(-c // 8) * 8


@torch.no_grad()
def masked_adamw_step(optimizer: torch.optim.AdamW, masks: dict[torch.Tensor, PackedMask], chunk: int) -> None:
    """One AdamW step in which only masked entries move (see the module docstring).

    The arithmetic is torch's single-tensor AdamW (decoupled weight decay, bias corrections, eps added after
    the square root), applied to chunks and written back only where the mask is set.
    """
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise NotImplementedError("masked AdamW step supports neither amsgrad nor maximize")
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            mask = masks.get(p)
            if mask is None:
                continue
            step = float(state["step"])
            step_size = lr / (1 - beta1**step)
            bc2_sqrt = (1 - beta2**step) ** 0.5
            flat = (p.view(-1), p.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1))
            for lo in range(0, p.numel(), chunk):
                hi = min(p.numel(), lo + chunk)
                sel = mask.slice(lo, hi)
                if not sel.any():
                    continue
                w, g, m, v = (t[lo:hi] for t in flat)
                m_new = torch.lerp(m, g, 1 - beta1)
                v_new = (v * beta2).addcmul_(g, g, value=1 - beta2)
                w_new = w * (1 - lr * wd)
                w_new.addcdiv_(m_new, (v_new.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
                m.copy_(torch.where(sel, m_new, m))
                v.copy_(torch.where(sel, v_new, v))
                w.copy_(torch.where(sel, w_new, w))


@torch.no_grad()
def mask_gradients(grads: dict[torch.Tensor, PackedMask], chunk: int) -> None:
    """grad ← grad · mask, chunk by chunk (the released MMUnlearner's gradient masking)."""
    for p, mask in grads.items():
        if p.grad is None:
            continue
        g = p.grad.view(-1)
        for lo in range(0, g.numel(), chunk):
            hi = min(g.numel(), lo + chunk)
            g[lo:hi].mul_(mask.slice(lo, hi).to(g.dtype))


def clone_and_restore_step(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                           masks: dict[str, torch.Tensor]) -> None:
    """The engine's earlier masked update, kept as the reference that ``masked_adamw_step`` is tested and
    benchmarked against: clone every parameter and both moments, ``optimizer.step()``, then put back every
    entry outside the mask (≥ 3× the trainable bytes of transient memory). Parameters absent from ``masks``
    are restored whole."""
    saved = []
    for n, p in params.items():
        keep = ~masks[n].to(p.device) if n in masks else torch.ones_like(p, dtype=torch.bool)
        state = optimizer.state.get(p, {})
        moments = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in state}
        saved.append((p, keep, p.detach().clone(), moments))
    optimizer.step()
    with torch.no_grad():
        for p, keep, old, moments in saved:
            p[keep] = old[keep]
            state = optimizer.state[p]
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    state[k][keep] = moments[k][keep] if k in moments else 0.0
