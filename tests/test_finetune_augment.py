"""The main fine-tuning stage's image augmentation: fresh draws every step, images only, reproducible."""

import torch

from mmunlearn.commands import open_model
from mmunlearn.data.batches import BatchStream, ImageCache, to_items
from mmunlearn.train import finetune as finetune_module
from mmunlearn.train.finetune import augmented, micro_steps


def test_augmented_changes_images_only_and_draws_afresh():
    pv = torch.rand(3, 3, 16, 16)
    batch = {"input_ids": torch.ones(3, 5, dtype=torch.long), "pixel_values": pv}
    torch.manual_seed(0)
    a, b = augmented(batch), augmented(batch)
    assert a["input_ids"] is batch["input_ids"] and a["pixel_values"].shape == pv.shape
    assert a["pixel_values"].dtype == pv.dtype
    assert not torch.allclose(a["pixel_values"], pv) and not torch.allclose(a["pixel_values"], b["pixel_values"])
    torch.manual_seed(0)  # torch's global generator, which checkpoints save: a resumed run draws the same
    assert torch.equal(augmented(batch)["pixel_values"], a["pixel_values"])
    text_only = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
    assert augmented(text_only) is text_only
    odd = {"pixel_values": torch.rand(2, 5, 3, 8, 8)}  # patch-stacked layouts (not (B, 3, H, W)) are left alone
    assert augmented(odd) is odd


def test_main_stage_steps_see_augmented_images_only_when_asked(small_bench, monkeypatch):
    adapter = open_model("tiny", small_bench)
    images = ImageCache(small_bench)
    vqa = [e for e in small_bench.examples if e.purpose == "train" and e.kind == "vqa"][:4]
    plain = adapter.encode(to_items(vqa, images))["pixel_values"]
    seen = []
    monkeypatch.setattr(finetune_module, "ce_loss", lambda ad, batch: seen.append(batch["pixel_values"]) or 0.0)
    for augment_images in (False, True, True):
        stream = BatchStream(adapter, vqa, images, batch_size=4, seed=0)
        stream.next_examples = lambda: list(vqa)  # the same four examples every step, in order
        for closure in micro_steps(adapter, stream, 1, augment_images):
            closure()
    assert torch.equal(seen[0], plain)
    assert not torch.allclose(seen[1], plain) and not torch.allclose(seen[1], seen[2])
