"""Several processes under ``accelerate launch``: which rank writes, how work is split, how results meet.

One process (the default) is world size 1 and every function here is the identity or a no-op, so the
single-process path is the one that always ran. With N processes (``accelerate launch --num_processes N``,
``accelerate.debug_launcher``, torchrun) accelerate initialises ``torch.distributed`` and:

* every rank holds the whole model (data parallel) or its shard (FSDP2, ``train/fsdp.py``); a training step's
  batch is split into ``world × gradient_accumulation`` equal micro-batches (``micro_slices``), rank r taking
  its consecutive share, and gradients are averaged across ranks (``average_gradients``) — the same update as
  one process accumulating the same micro-batches;
* work that is a list of batches (saliency scoring, reference log-probs, evaluation) goes round-robin by whole
  batch (``my_batches``), so every item is computed in exactly the batch one process would use, and the
  results are gathered (``gather_indexed``, ``gather_objects``): the JSON equals one process's;
* only rank 0 writes outputs and shows progress (``is_main``); a failure on one rank reaches every rank at the
  next agreement point (``agree``) and all stop with the same one-line error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from mmunlearn.errors import ConfigError, MMUError

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def launched() -> bool:
    """Whether a launcher started several processes (accelerate/torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group of a multi-process launch (accelerate's state does it once per process)."""
    if launched() and _dist() is None:
        from accelerate import PartialState

        PartialState()


def world() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's accelerator: ``cuda:<local rank>`` under a multi-GPU launch, else cuda / cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if world() > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda")


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


# ---- agreement on failures ------------------------------------------------------------------------------


class RankFailed(MMUError):
    """Another rank stopped with an error that is not the tool's own (its traceback is on that rank)."""


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (one process: ``[obj]``)."""
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def agree(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, every rank raises the same error.

    The tool's own errors (MMUError) are re-raised with their type and message on every rank (marked
    ``agreed``, so that only rank 0 prints the line); any other exception is re-raised where it happened and
    is a ``RankFailed`` naming that rank everywhere else.
    """
    if _dist() is None:
        return fn()
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # every failure must reach the other ranks, or they wait forever
        error = e
    report = None if error is None else (type(error).__name__, str(error), isinstance(error, MMUError))
    reports = gather_objects(report)
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return result
    if error is not None and not isinstance(error, MMUError):
        raise error
    r, (name, message, own) = failed[0]
    if error is not None and isinstance(error, MMUError) and r == rank():
        error.agreed = True  # type: ignore[attr-defined]
        raise error
    agreed = _own_error(name, message) if own else RankFailed(f"rank {r} stopped with {name}: {message}")
    agreed.agreed = True  # type: ignore[attr-defined]
    raise agreed


def _own_error(name: str, message: str) -> MMUError:
    from mmunlearn import errors

    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MMUError)) or name in ("RunInterrupted",):
        cls = MMUError
    try:
        return cls(message)
    except TypeError:
        return MMUError(message)


# ---- splitting work ----------------------------------------------------------------------------------------


def micro_slices(n: int, accumulation: int, what: str = "batch") -> list[slice]:
    """This rank's micro-batches of a global batch of ``n``: ``world × accumulation`` equal parts, rank r
    taking parts ``r·accumulation … (r+1)·accumulation − 1``. Equal parts make the mean of the micro-batch
    losses the same whatever the split between ranks and accumulation."""
    parts = world() * accumulation
    if parts == 1:
        return [slice(0, n)]
    if n % parts:
        raise ConfigError(
            f"{what} of {n} examples does not split into {parts} equal micro-batches ({world()} processes x "
            f"gradient_accumulation {accumulation}); choose batch_size as a multiple of {parts}"
        )
    size = n // parts
    first = rank() * accumulation
    return [slice((first + i) * size, (first + i + 1) * size) for i in range(accumulation)]


_dealt = [0]  # batches dealt so far in this process: every rank deals the same sequence, so they agree


def my_batches(batches: Iterable[T]) -> Iterator[T]:
    """This rank's share of the batches, dealt round-robin (whole batches: each item is computed in the batch
    one process would put it in). The deal continues across calls, so many short lists (evaluation units of a
    batch or two) still spread over the ranks."""
    w, r = world(), rank()
    if w == 1:
        yield from batches
        return
    for b in batches:
        i = _dealt[0]
        _dealt[0] += 1
        if i % w == r:
            yield b


def gather_indexed(out: list[T], done: Sequence[int]) -> list[T]:
    """Merge a list that each rank filled at the positions ``done``: every rank gets every position."""
    if _dist() is None:
        return out
    for part in gather_objects([(i, out[i]) for i in done]):
        for i, v in part:
            out[i] = v
    return out


# ---- gradients -----------------------------------------------------------------------------------------------


@torch.no_grad()
def average_gradients(tensors: Sequence[torch.Tensor]) -> None:
    """Mean of each tensor's ``.grad`` over the ranks (what DDP's all-reduce computes), in place.

    A tensor without a gradient on some ranks (e.g. the vision tower on a text-only micro-batch) counts as
    zero there; one without a gradient on every rank keeps none, as on one process (AdamW then skips it).
    """
    d = _dist()
    if d is None:
        return
    dev = tensors[0].device if tensors else torch.device("cpu")
    has = torch.tensor([t.grad is not None for t in tensors], dtype=torch.float32, device=dev)
    d.all_reduce(has)
    scale = 1.0 / d.get_world_size()
    pending = []
    for t, present in zip(tensors, has.tolist()):
        if not present:
            continue
        if t.grad is None:
            t.grad = torch.zeros_like(t)
        pending.append((t, d.all_reduce(t.grad, async_op=True)))
    for t, work in pending:
        work.wait()
        t.grad.mul_(scale)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Logged numbers averaged over the ranks (the same keys on every rank)."""
    if _dist() is None:
        return values
    keys = sorted(values)
    parts = gather_objects([values[k] for k in keys])
    return {k: sum(p[i] for p in parts) / len(parts) for i, k in enumerate(keys)}


def sum_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (saliency scores)."""
    d = _dist()
    if d is None:
        return
    for t in tensors.values():
        d.all_reduce(t)
