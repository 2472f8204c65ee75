"""The frozen vanilla model that KL_Min, GA+KL, SIU (DMK) and NPO compare with — without a second fp32 copy.

Which kind a run gets (``reference_for``):

* ``adapters-disabled`` — LoRA runs: the reference is the trained model itself with its adapters switched
  off (``PeftModel.disable_adapter``), which is exactly the vanilla model; no extra weights at all;
* ``frozen-copy`` — full-parameter runs of the methods that need reference *logits* (KL_Min, GA+KL, SIU): a
  copy in the model's own dtype, and never fp32 on a GPU (a float32 model on CUDA gets a bfloat16 copy);
* ``precomputed`` — NPO needs only log π_ref(y|x), one number per forget sequence: computed once before
  training (one forward pass per forget batch), then no reference model is kept.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mmunlearn.data.schema import Example
from mmunlearn.errors import ConfigError
from mmunlearn.methods import answer_states as AS
from mmunlearn.models.base import ModelAdapter

KINDS = ("adapters-disabled", "frozen-copy", "precomputed")


@dataclass
class Reference:
    """The reference of one run. ``states(batch)`` gives its answer-position states (no gradient);
    ``logprobs`` holds precomputed sequence log-probs (sum, answer tokens) per example id."""

    kind: str
    adapter: ModelAdapter | None = None
    logprobs: dict[str, tuple[float, int]] = field(default_factory=dict)

    @torch.no_grad()
    def states(self, batch: dict[str, torch.Tensor]) -> AS.AnswerStates:
        if self.kind == "precomputed" or self.adapter is None:
            raise ConfigError("this reference holds precomputed log-probs only; the method asked for logits")
        with self._active() as adapter:
            return AS.from_batch(adapter, batch)

    @torch.no_grad()
    def full_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, V) logits at every position: only for reproductions of released code that need them."""
        if self.kind == "precomputed" or self.adapter is None:
            raise ConfigError("this reference holds precomputed log-probs only; the method asked for logits")
        with self._active() as adapter:
            inputs = adapter.to_device(batch)
            inputs.pop("labels", None)
            inputs.pop("answer_start", None)
            return adapter.model(**inputs).logits

    @contextlib.contextmanager
    def _active(self) -> Iterator[ModelAdapter]:
        adapter = self.adapter
        model = adapter.model
        if self.kind != "adapters-disabled":
            yield adapter
            return
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                yield adapter
        finally:
            model.train(was_training)

    def sequence_logprobs(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) summed log π_ref and (B,) answer-token counts of precomputed examples."""
        missing = [e.id for e in examples if e.id not in self.logprobs]
        if missing:
            raise ConfigError(f"no precomputed reference log-prob for example {missing[0]!r}")
        lp = torch.tensor([self.logprobs[e.id][0] for e in examples])
        n = torch.tensor([self.logprobs[e.id][1] for e in examples])
        return lp, n

    def extra_bytes(self, model: torch.nn.Module) -> int:
        """Bytes of tensors this reference holds beyond ``model``'s own storage (0 with disabled adapters)."""
        if self.adapter is None:
            return 16 * len(self.logprobs)
        own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        seen, total = set(), 0
        for t in (*self.adapter.model.parameters(), *self.adapter.model.buffers()):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in own and ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total


def reference_dtype(model: torch.nn.Module) -> torch.dtype:
    """The copy's dtype: the model's own, except that a float32 model on a GPU gets a bfloat16 copy."""
    p = next(model.parameters())
    if p.is_cuda and p.dtype == torch.float32:
        return torch.bfloat16
    return p.dtype


def frozen_copy(adapter: ModelAdapter) -> Reference:
    """A frozen copy of the (vanilla) model in eval mode, behind the same adapter; taken before training."""
    dtype = reference_dtype(adapter.model)
    model = copy.deepcopy(adapter.model).to(dtype).eval()
    model.requires_grad_(False)
    return Reference("frozen-copy", type(adapter)(model, adapter.processor, adapter.path))


def adapters_disabled(adapter: ModelAdapter) -> Reference:
    """The LoRA-wrapped trained model with its adapters switched off: the vanilla model, no copy."""
    if not hasattr(adapter.model, "disable_adapter"):
        raise ConfigError("an adapters-disabled reference needs a PEFT (LoRA) model")
    return Reference("adapters-disabled", adapter)


@torch.no_grad()
def precomputed(adapter: ModelAdapter, batches: Iterator[tuple[list[Example], dict]]) -> Reference:
    """log π_ref(y|x) (sum over answer tokens) and the answer length of every example, from the vanilla model."""
    was_training = adapter.model.training
    adapter.model.eval()
    out: dict[str, tuple[float, int]] = {}
    try:
        for examples, batch in batches:
            st = AS.from_batch(adapter, batch)
            lp, n = AS.sequence_logprob(st), AS.answer_token_counts(st)
            for e, v, k in zip(examples, lp.tolist(), n.tolist(), strict=True):
                out[e.id] = (v, int(k))
    finally:
        adapter.model.train(was_training)
    return Reference("precomputed", None, out)
