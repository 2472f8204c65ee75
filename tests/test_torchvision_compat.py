"""torchvision imports beside the pinned CPU torch, and what does not work still fails loudly."""

import importlib.util

import pytest
import torch

from mmunlearn import torchvision_compat

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")


def test_torchvision_imports_and_its_transforms_run():
    import torchvision
    from torchvision.transforms.v2 import functional as F

    assert torchvision.__version__
    assert F.resize(torch.rand(3, 32, 32), [16, 16]).shape == (3, 16, 16)


def test_declared_ops_raise_instead_of_answering():
    import torchvision.ops

    if not torchvision_compat._LIBRARIES:
        pytest.skip("torchvision's compiled ops loaded: nothing was declared")
    with pytest.raises(RuntimeError, match=r"custom C\+\+ ops"):
        torchvision.ops.nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.9]), 0.5)


def test_declaring_is_done_at_most_once():
    import torchvision  # noqa: F401

    assert torchvision_compat.declare_missing_ops() is False
