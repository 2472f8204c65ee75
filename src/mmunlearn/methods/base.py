"""The unlearning-method contract and its registry.

A method is one class in one file, registered with one line (``@register("name")``). The training loop
(``mmunlearn.train.unlearn``) owns data, batching, the engine and export; a method only says:

* ``Options``: a dataclass of its own options (validated in ``__post_init__``), built from the config's
  ``method_options`` mapping; unknown keys are errors;
* ``defaults``: the training settings it is tuned with (steps/epochs, lr, batch size, trainable groups...),
  used wherever the run's configuration leaves a field unset; a ``method_options`` entry gives option values
  tuned for the same recipe (the run's own ``method_options`` win);
* ``prepare(ctx)`` (optional): build what it needs before training: e.g. its own training data (PO's
  refusals, SIU's multifaceted data) or a saliency mask; ``reference`` asks the loop for the vanilla model in
  ``ctx.reference``: ``"logits"`` (KL/DMK terms: the LoRA model with adapters disabled, or a frozen copy in
  the model's dtype) or ``"sequence_logprobs"`` (NPO: log π_ref per forget sequence, precomputed once);
  see ``methods/reference.py``;
* ``schedule(ctx, steps, epochs)`` (optional): which batches each optimisation step draws (default: one joint
  step on a forget batch and, if ``uses_retain``, a retain batch) and which steps are masked;
* ``step_mask(ctx, step)`` (optional): the per-parameter update mask of a masked step;
* ``trainable_masks(ctx)`` (optional): masks whose entries are the run's only trainable state, in every step
  (the engine then keeps optimizer state for those entries only; ``train/sparse.py``);
* ``loss(ctx, batches)``: the scalar to minimise and a few numbers to log;
* ``paper_exact`` / ``paper_exact_defaults`` (optional): the method options and training settings that
  reproduce the official code, applied by ``UnlearnConfig(paper_exact=True)`` (docs/paper_exact.md).

Methods share the loss helpers of ``losses.py`` and never inherit from each other. Family knowledge (image
tokens, parameter groups, prompts) stays in the model adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmunlearn.data.batches import ImageCache
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError
from mmunlearn.methods import answer_states as AS
from mmunlearn.methods.reference import Reference
from mmunlearn.models.base import ModelAdapter
from mmunlearn.registry import Registry

Batch = dict[str, torch.Tensor]


@dataclass
class KLWeightOptions:
    """Options of the methods whose only knob is the weight of a KL term to the reference (GA+KL, KL_Min)."""

    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kl_weight < 0:
            raise ConfigError(f"option kl_weight must be >= 0, got {self.kl_weight}")


@dataclass
class NoOptions:
    """A method without options."""


@dataclass(frozen=True)
class Step:
    """What one optimisation step draws (a forget batch, a retain batch, or both) and whether it is masked."""

    forget: bool = True
    retain: bool = False
    masked: bool = False


@dataclass
class Batches:
    """The encoded batches of one step (None when the step draws none) and the examples behind them."""

    forget: Batch | None = None
    retain: Batch | None = None
    forget_examples: list[Example] = field(default_factory=list)
    retain_examples: list[Example] = field(default_factory=list)


@dataclass
class Context:
    """Everything a method may use. ``prepare`` may replace ``forget_data`` / ``retain_data`` / ``images``.

    ``out_dir`` is the (temporary) output directory; artefacts a method writes there are listed in
    ``artefacts`` (name -> file name) for the run record. ``engine`` is set once training starts.
    ``resume``: the run continues from a checkpoint; artefacts ``prepare`` wrote before are in ``out_dir``
    and are read back instead of being built again.
    """

    adapter: ModelAdapter
    bench: Benchmark
    forget_entities: list[str]
    forget_data: list[Example]
    retain_data: list[Example]
    images: ImageCache
    batch_size: int
    seed: int
    out_dir: Path
    lora: bool = False
    trainable: tuple[str, ...] = ()  # the parameter groups this run trains (``UnlearnConfig.trainable``)
    reference: Reference | None = None
    engine: Any = None
    progress: bool = False
    artefacts: dict[str, str] = field(default_factory=dict)
    n_forget_batches: int = 0
    n_retain_batches: int = 0
    resume: bool = False

    def entity_name(self, entity: str) -> str:
        names = self.bench.entity_names()
        if not names.get(entity):
            raise ConfigError(f"entity {entity!r} has no name in the benchmark's info; SIU needs the concept's name")
        return names[entity]


class Method:
    """Base class of every unlearning method (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    defaults: ClassVar[dict[str, Any]] = {}
    uses_retain: ClassVar[bool] = False
    reference: ClassVar[str | None] = None  # None | "logits" | "sequence_logprobs"
    # method options forced, and training settings defaulted, in paper-exact mode (the official code's)
    paper_exact: ClassVar[dict[str, Any]] = {}
    paper_exact_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Any = None) -> None:
        self.opt = options if options is not None else self.Options()

    def prepare(self, ctx: Context) -> None:
        """Build data, masks or other state before training; the model is still the vanilla one here."""

    def mask_mode(self) -> str:
        """How the engine applies ``step_mask``: 'update' (a true constraint) or 'gradient'."""
        return "update"

    def schedule(self, ctx: Context, steps: int | None, epochs: float | None) -> list[Step]:
        """Default: ``steps`` joint steps (or ``epochs`` passes over the forget batches)."""
        n = count_steps(steps, epochs, ctx.n_forget_batches)
        return [Step(forget=True, retain=self.uses_retain)] * n

    def step_mask(self, ctx: Context, step: Step) -> dict[str, torch.Tensor] | None:
        return None

    def trainable_masks(self, ctx: Context) -> dict[str, Any] | None:
        return None

    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("unlearning method")


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a ``Method`` subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"unlearning method {name!r} must be a subclass of Method")
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


def count_steps(steps: int | None, epochs: float | None, per_epoch: int) -> int:
    """``steps`` if given, else ``ceil(epochs × per_epoch)`` (at least 1)."""
    if steps:
        return steps
    if not epochs:
        raise ConfigError("set either steps or epochs (both are unset)")
    return max(1, math.ceil(epochs * per_epoch))


# ---- model calls shared by the methods ------------------------------------------------------------------


def forward_logits(adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    """(B, T, V) logits of a batch from ``adapter.encode``: only for the released-code reproductions that
    need every position; the losses use ``batch_states`` (answer positions only)."""
    inputs = adapter.to_device(batch)
    inputs.pop("labels", None)
    inputs.pop("answer_start", None)
    return adapter.model(**inputs).logits


def labels_of(adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    return batch["labels"].to(next(adapter.model.parameters()).device)


def batch_states(adapter: ModelAdapter, batch: Batch) -> AS.AnswerStates:
    """Final hidden states at the batch's answer positions (the LM head is applied later, in chunks)."""
    return AS.from_batch(adapter, batch)


def batch_ce(adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over a batch's answer tokens: the term every CE-based loss is built from."""
    return AS.ce(batch_states(adapter, batch))


def reference_states(ctx: Context, batch: Batch) -> AS.AnswerStates:
    """The reference model's answer-position states on the same batch (no gradient)."""
    if ctx.reference is None:
        raise ConfigError("this method needs the reference model (set reference = 'logits')")
    return ctx.reference.states(batch)
