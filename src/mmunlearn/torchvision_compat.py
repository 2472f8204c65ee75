"""Let a CUDA build of torchvision import beside a CPU build of torch.

PyPI's torchvision wheels are CUDA builds. Beside the CPU torch wheel (the one a laptop or CI install pins), their
compiled ops (``torchvision/_C.so``) cannot load, since they link ``libtorch_cuda``. torchvision 0.28 then fails
on import ("operator torchvision::nms does not exist"): it registers fake kernels for ``nms`` and ``qnms``
without checking that its ops loaded, while every other registration is guarded. What transformers uses from
torchvision (``transforms.v2`` in the fast image processors, which the Qwen-VL processors need) is pure torch.

:func:`declare_missing_ops` declares those two schemas, exactly as torchvision's C++ declares them, when and only
when the compiled ops fail to load, so that torchvision imports. Calling ``nms`` itself still raises
torchvision's own "Couldn't load custom C++ ops" error. With a torchvision whose ops load, it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# torchvision/csrc/ops/nms.cpp and quantized/cpu/qnms_kernel.cpp
_UNGUARDED_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list = []  # a torch.library.Library keeps its definitions only while it is alive


def declare_missing_ops() -> bool:
    """Declare torchvision's unguarded op schemas if its compiled ops cannot load; True if it did."""
    if "torchvision" in sys.modules or _LIBRARIES:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    compiled = Path(next(iter(spec.submodule_search_locations))) / "_C.so"
    if not compiled.is_file():
        return False
    import torch

    try:
        torch.ops.load_library(str(compiled))
        return False
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _UNGUARDED_SCHEMAS:
        library.define(schema)
    _LIBRARIES.append(library)
    return True
