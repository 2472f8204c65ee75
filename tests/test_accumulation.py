"""Gradient accumulation on one process, the micro-batch split, and the vision-tower touch of sharded runs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmunlearn import distributed as D
from mmunlearn.errors import ConfigError
from mmunlearn.methods import answer_states as AS
from mmunlearn.methods.base import batch_ce
from mmunlearn.models.base import Item
from mmunlearn.models.llava import LlavaAdapter
from mmunlearn.models.qwen2_vl import Qwen2VLAdapter
from mmunlearn.train.engine import Engine, OptimConfig
from mmunlearn.train.finetune import FinetuneConfig
from mmunlearn.train.unlearn import UnlearnConfig
from tiny_models import build_llava, build_qwen2_vl


def test_one_process_split_is_the_whole_batch_or_equal_parts():
    assert D.world() == 1
    assert D.micro_slices(6, 1) == [slice(0, 6)]
    assert D.micro_slices(6, 3) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(ConfigError, match="multiple of 4"):
        D.micro_slices(6, 4)


def test_gradient_accumulation_is_an_option_of_every_training_command():
    assert FinetuneConfig(gradient_accumulation=2).optim().gradient_accumulation == 2
    assert UnlearnConfig(method="ga_diff", gradient_accumulation=4).gradient_accumulation == 4
    for bad in (lambda: FinetuneConfig(gradient_accumulation=0), lambda: UnlearnConfig(gradient_accumulation=0),
                lambda: OptimConfig(gradient_accumulation=0)):
        with pytest.raises(ConfigError, match="gradient_accumulation"):
            bad()


def items():
    img = Image.new("RGB", (32, 32), (200, 40, 90))
    return [Item("Who is shown here?", "Alice Moreau", img), Item("Where was she born?", "Paris, France"),
            Item("What does she do?", "She is a painter"), Item("Describe the picture.", "A portrait", img)]


def test_accumulated_micro_batches_give_the_mean_of_their_gradients():
    """Two micro-batches accumulated = the average of the two separate gradients (one step of plain SGD-like
    comparison: AdamW state after one step from the same gradients must be the same)."""
    model, proc = build_llava()
    a = LlavaAdapter(model, proc)
    parts = [a.encode(items()[:2]), a.encode(items()[2:])]
    names = [n for n, _ in a.model.named_parameters()]
    grads = []
    for b in parts:
        a.model.zero_grad()
        batch_ce(a, b).backward()
        grads.append({n: p.grad.clone() for n, p in a.model.named_parameters() if p.grad is not None})
    a.model.zero_grad()
    engine = Engine(a, OptimConfig(lr=1e-3, max_steps=1, scheduler="constant", grad_clip=0.0,
                                   gradient_accumulation=2))
    seen = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: seen.__setitem__(n, p.grad.clone()))
             for n, p in engine.model.named_parameters()]
    logs = engine.step([lambda b=b: (batch_ce(a, b), {}) for b in parts])
    for h in hooks:
        h.remove()
    assert logs["loss"] > 0 and len(seen) > 0
    for n in names:
        want = sum(g[n] for g in grads if n in g) / 2 if any(n in g for g in grads) else None
        if want is not None:
            assert torch.allclose(seen[n], want, atol=1e-7), n


@pytest.mark.parametrize("build,cls", [(build_llava, LlavaAdapter), (build_qwen2_vl, Qwen2VLAdapter)])
def test_vision_touch_changes_nothing_but_reaches_the_vision_tower(build, cls):
    model, proc = build()
    a = cls(model, proc)
    text = a.encode([Item("Where was she born?", "Paris, France")])
    plain = batch_ce(a, text)
    a.model.zero_grad()
    a.touch_vision = True
    touched = AS.ce(AS.from_batch(a, text))
    assert touched.item() == plain.item()
    touched.backward()
    vision = {n: p for n, p in a.model.named_parameters() if a.group_of(n) in ("vision", "projector")}
    touched_grads = {n for n, p in vision.items() if p.grad is not None}
    assert all(not vision[n].grad.any() for n in touched_grads)  # contributes exactly zero
    a.model.zero_grad(set_to_none=True)
    batch_ce(a, a.encode([items()[0]])).backward()  # the parameters an image batch reaches
    assert touched_grads == {n for n, p in vision.items() if p.grad is not None} != set()


def test_sharding_options_refuse_one_process_and_masks(monkeypatch):
    from mmunlearn.train import zero3

    model, proc = build_llava()
    with pytest.raises(ConfigError, match="several processes"):
        Engine(LlavaAdapter(model, proc), OptimConfig(max_steps=1, fsdp=True))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert not zero3.requested()  # DeepSpeed only under a multi-process launch
    with pytest.raises(ConfigError, match="ZeRO-3"):
        zero3.check({"w": None})
