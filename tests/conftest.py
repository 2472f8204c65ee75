import os
import tempfile

import pytest
import torch

import mmunlearn  # noqa: F401  (before transformers: makes a CUDA torchvision importable beside CPU torch)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["MMUNLEARN_CACHE"] = tempfile.mkdtemp(prefix="mmunlearn-test-cache-")
# Tiny models gain nothing from threads, and threads that spin-wait collapse when another process shares the
# cores; MMU_TEST_THREADS raises it.
torch.set_num_threads(int(os.environ.get("MMU_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory):
    """A reduced built-in benchmark (8 people), shared by the tests that only read it."""
    from mmunlearn.data.fictitious import FictitiousConfig, make_fictitious

    return make_fictitious(tmp_path_factory.mktemp("bench") / "data",
                           FictitiousConfig(num_people=8, train_images=2, test_images=1))
