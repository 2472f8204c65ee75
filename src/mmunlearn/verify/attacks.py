"""Attacks that bring "forgotten" knowledge back: a little relearning, and weight quantization.

Both work on a copy of the model; the measured model is never changed. Evidence from text LLMs: 4-bit
quantization raised retained forgotten knowledge from 21 % to 83 % (Zhang et al., ICLR 2025; INT8 mostly
benign), and a few fine-tuning steps on related data recover most of it (Hu et al., ICLR 2025).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmunlearn.data.batches import BatchStream, ImageCache
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError, DataError
from mmunlearn.models.base import ModelAdapter
from mmunlearn.train.engine import GROUPS, Engine, LoraOptions, OptimConfig


def recovery(after: float | None, unlearned: float | None, vanilla: float | None,
             min_gap: float = 5.0) -> float | None:
    """Attack recovery of a score: (s_after - s_unlearned) / (s_vanilla - s_unlearned).

    0 = nothing came back, 1 = everything the unlearning removed came back (it can exceed 1 or be negative).
    None when a score is missing or the unlearning moved the score by less than ``min_gap`` (points of %):
    then there is nothing to recover and the ratio would only amplify noise.
    """
    if after is None or unlearned is None or vanilla is None:
        return None
    gap = vanilla - unlearned
    if abs(gap) < min_gap:
        return None
    return (after - unlearned) / gap


# ------------------------------------------------------------------------------------------------ quantization

def rtn_dequantized(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Round-to-nearest symmetric quantization per group of ``group_size`` input columns, dequantized.

    Per output row and group g of columns: scale = max|w_g| / (2^(bits-1) - 1); q = clamp(round(w / scale),
    -(2^(bits-1) - 1), 2^(bits-1) - 1); the result is q * scale (an all-zero group stays zero). A last group
    shorter than ``group_size`` is quantized on its own. Works on any float tensor (2-D weights expected).
    """
    if bits < 2 or bits > 16:
        raise ConfigError(f"quantization bits must be in [2, 16], got {bits}")
    if group_size < 1:
        raise ConfigError(f"group_size must be >= 1, got {group_size}")
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().float().reshape(-1, w.shape[-1])
    cols = flat.shape[1]
    pad = (-cols) % group_size
    x = torch.nn.functional.pad(flat, (0, pad)).reshape(flat.shape[0], -1, group_size)
    scale = x.abs().amax(-1, keepdim=True) / qmax
    q = torch.where(scale > 0, torch.round(x / scale.clamp(min=torch.finfo(torch.float32).tiny)), 0.0)
    deq = (q.clamp(-qmax, qmax) * scale).reshape(flat.shape[0], -1)[:, :cols]
    return deq.reshape(w.shape).to(w.dtype)


def quantizable(model: torch.nn.Module, skip: Sequence[str] = ("lm_head",)) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers weight-only quantization touches: every ``nn.Linear`` except names ending in ``skip``
    (the output head, as GPTQ / AWQ / bitsandbytes leave it in high precision)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(n.endswith(s) for s in skip)]


def quantized_copy(adapter: ModelAdapter, scheme: str, group_size: int = 128,
                   skip: Sequence[str] = ("lm_head",)) -> ModelAdapter:
    """A copy of the model with its linear weights quantized and dequantized back to their dtype.

    ``scheme``: ``"int<b>"`` (round-to-nearest, ``rtn_dequantized``, always available) or ``"nf4"``
    (bitsandbytes' 4-bit NormalFloat, blocks of 64; needs the ``nf4`` extra). The copy runs in the original
    dtype, so what changes is exactly the rounding of the weights.
    """
    model = copy.deepcopy(adapter.model)
    if scheme == "nf4":
        quantize = _nf4_dequantized()
    elif scheme.startswith("int") and scheme[3:].isdigit():
        bits = int(scheme[3:])
        quantize = lambda w: rtn_dequantized(w, bits, group_size)
    else:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; use int8, int4 (any int<bits>) or nf4")
    with torch.no_grad():
        for _, m in quantizable(model, skip):
            m.weight.copy_(quantize(m.weight))
    return type(adapter)(model, adapter.processor, adapter.path)


def nf4_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _nf4_dequantized():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ConfigError("NF4 quantization needs bitsandbytes: pip install 'mmunlearn[nf4]'") from e

    def quantize(w: torch.Tensor) -> torch.Tensor:
        q, state = bnbf.quantize_4bit(w.detach().contiguous(), blocksize=64, quant_type="nf4")
        return bnbf.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)

    return quantize


# ------------------------------------------------------------------------------------------------ relearning

@dataclass
class RelearnSetting:
    """One relearning attack: LoRA (``lora_r`` > 0) or full-parameter fine-tuning at ``lr`` for ``epochs``.

    Standard settings from the text-LLM literature: LoRA r=8 at lr 1e-4, and full-parameter at lr 2e-5, one
    epoch, batch 8 (``RelearnSetting.standard()``).
    """

    name: str = "full"
    lr: float = 2e-5
    lora_r: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    trainable: tuple[str, ...] = GROUPS

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs <= 0 or self.batch_size < 1 or self.lora_r < 0:
            raise ConfigError(f"relearn setting {self.name!r}: lr and epochs must be > 0, batch_size >= 1, "
                              f"lora_r >= 0")

    @staticmethod
    def standard() -> tuple[RelearnSetting, ...]:
        return (RelearnSetting("lora", lr=1e-4, lora_r=8), RelearnSetting("full", lr=2e-5))


def relearn_split(bench: Benchmark, forget: Sequence[str], kind: str = "vqa") -> tuple[list[Example], list[Example]]:
    """(relearning data, held-out evaluation items) about the forget entities, disjoint by construction.

    With at least two question types, relearning gets every other type (sorted names: on the built-in benchmark
    birthplace, identity and occupation) and the other types are measured (hobby, instrument, pet): the attack
    teaches related facts, never the measured ones. Otherwise the forget entities are split in two and
    relearning sees the first half only. The measured items are those on each entity's first training image
    (the unlearning image) and on images no training example shows (held-out views); relearning uses training
    examples of ``kind`` whose images no measured item shows (the other training views).
    """
    train = [e for e in bench.select("forget", forget, purpose="train") if e.kind == kind]
    evals = [e for s in ("forget", "test") for e in bench.select(s, forget, purpose="eval", kind=kind, task="mc")]
    if not train or not evals:
        raise DataError(f"relearning attack: the forget entities have no {kind} training examples or "
                        "multiple-choice questions")
    first: dict[str, str] = {}
    for e in train:
        if e.image is not None:
            first.setdefault(e.entity, e.image)
    trained = {e.image for e in train if e.image is not None}
    # questions on training views other than the first are left out, so those views stay available to relearn
    evals = [e for e in evals if e.image not in trained or e.image == first.get(e.entity)]
    qtypes = sorted({e.qtype for e in train} & {e.qtype for e in evals})
    if len(qtypes) >= 2:
        taught = set(qtypes[0::2])
        measured = [e for e in evals if e.qtype not in taught]
        data = [e for e in train if e.qtype in taught]
    else:
        ents = sorted(set(forget))
        if len(ents) < 2:
            raise DataError("relearning attack: needs two question types or two forget entities to keep the "
                            "relearning data apart from the measured items")
        half = set(ents[: len(ents) // 2])
        measured = [e for e in evals if e.entity not in half]
        data = [e for e in train if e.entity in half]
    shown = {e.image for e in measured}
    data = [e for e in data if e.image not in shown]
    if not data or not measured:
        raise DataError("relearning attack: no training example is left apart from the measured items")
    return data, measured


def relearned_copy(adapter: ModelAdapter, bench: Benchmark, data: list[Example], setting: RelearnSetting,
                   seed: int = 0) -> tuple[ModelAdapter, int]:
    """A copy of the model fine-tuned on ``data`` (answer cross-entropy, one engine); returns it and its steps.

    LoRA adapters are merged before the copy is returned, so it is an ordinary model again.
    """
    from mmunlearn.train.finetune import ce_loss

    attacked = type(adapter)(copy.deepcopy(adapter.model), adapter.processor, adapter.path)
    batch = min(setting.batch_size, len(data))
    steps = max(1, round(setting.epochs * len(data) / batch))
    lora = LoraOptions(r=setting.lora_r, alpha=2 * setting.lora_r, dropout=0.0) if setting.lora_r else None
    engine = Engine(attacked, OptimConfig(lr=setting.lr, scheduler="constant", max_steps=steps,
                                          trainable=setting.trainable, lora=lora), seed=seed)
    stream = BatchStream(attacked, data, ImageCache(bench), batch, seed=seed)
    for _ in range(steps):
        engine.step(lambda: (ce_loss(attacked, next(stream)), {}))
    if lora is not None:
        attacked.model = attacked.model.merge_and_unload()
    attacked.model.eval()
    return attacked, steps
