"""Model families: one adapter each, looked up by family name or by a checkpoint's ``model_type``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmunlearn.errors import ModelError
from mmunlearn.models.base import Item, ModelAdapter
from mmunlearn.models.llava import LlavaAdapter
from mmunlearn.models.qwen2_vl import Qwen2VLAdapter
from mmunlearn.models.smol import SmolAdapter
from mmunlearn.registry import Registry

ADAPTERS: Registry[type[ModelAdapter]] = Registry("model family")
ADAPTERS.register("llava")(LlavaAdapter)
ADAPTERS.register("qwen2-vl")(Qwen2VLAdapter)
ADAPTERS.register("smol")(SmolAdapter)
FAMILIES = ("tiny", *ADAPTERS.names())

__all__ = ["ADAPTERS", "DTYPES", "FAMILIES", "Item", "ModelAdapter", "cpu_has_bf16", "dtype_name", "family_of",
           "load_adapter", "resolve_dtype"]

DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_dtype(name: str | torch.dtype = "auto") -> torch.dtype:
    """``auto``: bfloat16 on CUDA (what 7B checkpoints are trained and served in), float32 on the CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def dtype_name(name: str | torch.dtype = "auto") -> str:
    """The dtype a name resolves to, as run records and fingerprints write it: ``float32``, ``bfloat16``, ..."""
    return str(resolve_dtype(name)).removeprefix("torch.")


def cpu_has_bf16() -> bool:
    """Whether this machine trains on the CPU and its CPU computes in bfloat16 natively (AVX512-BF16 or AMX):
    there a smol training step takes 0.58 of its float32 time (bench/dtype_step.py); elsewhere bfloat16 is emulated."""
    if torch.cuda.is_available():
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU probes (private: guarded)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def family_of(path: str | Path) -> str:
    """The adapter family of a local checkpoint, from its config.json ``model_type``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg}: not valid JSON ({e.msg})") from e
    for name in ADAPTERS.names():
        if model_type in ADAPTERS.get(name).model_types:
            return name
    raise ModelError(f"{path}: model_type {model_type!r} is not supported; families: {', '.join(ADAPTERS.names())}")


def load_adapter(
    path: str | Path,
    family: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
) -> ModelAdapter:
    """Load a local model directory (or a hub id already in the local cache) with the right adapter, in
    ``dtype`` (see ``resolve_dtype``) with PyTorch's scaled-dot-product attention."""
    from transformers import AutoModelForImageTextToText

    local = Path(path).is_dir()
    if family is None:
        if not local:
            raise ModelError(f"model directory does not exist: {path} (pass --family to load a hub id)")
        family = family_of(path)
    cls = ADAPTERS.get("llava" if family == "tiny" else family)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=resolve_dtype(dtype), attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
        processor = cls.load_processor(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from e
    model_type = getattr(model.config, "model_type", None)
    if model_type not in cls.model_types:
        raise ModelError(f"{path}: model_type {model_type!r} does not belong to family {family!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return cls(model.to(device), processor, path)
