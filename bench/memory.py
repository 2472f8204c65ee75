"""Peak memory of a block of code, in bytes: CUDA allocator statistics on a GPU, the process's resident
high-water mark on a CPU.

On Linux the CPU figure is exact enough to compare code paths: the high-water mark (VmHWM) is reset through
``/proc/self/clear_refs`` before the block, and glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``,
set by ``ensure_exact_cpu_accounting`` before the interpreter starts) so every tensor buffer above 64 KiB is
its own mapping, returned to the system when freed — otherwise freed memory stays in the heap and a later
block reuses it without raising the resident size.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

THRESHOLD = "65536"


def ensure_exact_cpu_accounting() -> None:
    """Re-execute the current script with glibc's mmap threshold pinned, once."""
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") != THRESHOLD:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _status(field: str) -> int:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


@dataclass
class Peak:
    before: int = 0
    peak: int = 0

    @property
    def extra(self) -> int:
        """Bytes above what was allocated when the block began."""
        return max(0, self.peak - self.before)


@contextmanager
def peak_memory(device: torch.device | str = "cpu"):
    """Yields a ``Peak`` filled when the block ends: allocated bytes at its start and at its peak."""
    dev = torch.device(device)
    out = Peak()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out.before = torch.cuda.memory_allocated(dev)
        yield out
        torch.cuda.synchronize(dev)
        out.peak = torch.cuda.max_memory_allocated(dev)
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out.before = _status("VmRSS")
    yield out
    out.peak = _status("VmHWM")
