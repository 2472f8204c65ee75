"""The main fine-tuning stage's image augmentation: fresh draws every step, images only, the same whatever the
split of a batch into micro-batches, reproducible from torch's generator."""

import pytest
import torch

from mmunlearn.commands import open_model
from mmunlearn.data.batches import BatchStream, ImageCache, to_items
from mmunlearn.errors import ConfigError
from mmunlearn.train import finetune as finetune_module
from mmunlearn.train.finetune import augment, augment_draws, augmented, micro_steps


def test_augmented_changes_images_only_and_draws_afresh():
    pv = torch.rand(3, 3, 16, 16)
    batch = {"input_ids": torch.ones(3, 5, dtype=torch.long), "pixel_values": pv}
    torch.manual_seed(0)
    a, b = augmented(batch, augment_draws(3)), augmented(batch, augment_draws(3))
    assert a["input_ids"] is batch["input_ids"] and a["pixel_values"].shape == pv.shape
    assert a["pixel_values"].dtype == pv.dtype
    assert not torch.allclose(a["pixel_values"], pv) and not torch.allclose(a["pixel_values"], b["pixel_values"])
    torch.manual_seed(0)  # torch's global generator, which checkpoints save: a resumed run draws the same
    assert torch.equal(augment(pv), a["pixel_values"])
    text_only = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
    assert augmented(text_only, augment_draws(2)) is text_only
    odd = {"pixel_values": torch.rand(2, 5, 3, 8, 8)}  # patch-stacked layouts (not (B, 3, H, W)) are left alone
    assert augmented(odd, augment_draws(2)) is odd
    with pytest.raises(ConfigError, match="augment_images"):
        augmented(batch, augment_draws(2))


def _pixels_seen(adapter, examples, images, accumulation, augment_images, monkeypatch):
    seen = []
    monkeypatch.setattr(finetune_module, "ce_loss", lambda ad, batch: seen.append(batch.get("pixel_values")) or 0.0)
    stream = BatchStream(adapter, examples, images, batch_size=len(examples), seed=0)
    stream.next_examples = lambda: list(examples)  # the same examples every step, in order
    torch.manual_seed(3)
    for closure in micro_steps(adapter, stream, accumulation, augment_images):
        closure()
    return seen


def test_main_stage_augments_only_when_asked_and_alike_under_accumulation(small_bench, monkeypatch):
    adapter = open_model("tiny", small_bench)
    images = ImageCache(small_bench)
    train = [e for e in small_bench.examples if e.purpose == "train"]
    vqa = [e for e in train if e.kind == "vqa"][:3]
    qa = [e for e in train if e.kind == "qa"][:1]
    batch = [vqa[0], qa[0], vqa[1], vqa[2]]  # a text-only example among the images
    plain = adapter.encode(to_items(vqa, images))["pixel_values"]

    off = _pixels_seen(adapter, batch, images, 1, False, monkeypatch)
    assert torch.equal(off[0], plain)
    whole = _pixels_seen(adapter, batch, images, 1, True, monkeypatch)
    assert not torch.allclose(whole[0], plain)
    torch.manual_seed(3)  # one process, no accumulation: the draws of augmenting the batch's images at once
    assert torch.equal(whole[0], augment(plain))
    # two micro-batches ([image, text], [image, image]) train on exactly the images of the whole batch
    halves = _pixels_seen(adapter, batch, images, 2, True, monkeypatch)
    assert len(halves) == 2 and torch.allclose(torch.cat(halves), whole[0], atol=1e-6)
