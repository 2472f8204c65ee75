"""Vanilla fine-tuning: teach a model the whole benchmark (visual and textual) so unlearning has a target.

For a randomly initialised vision tower (the ``tiny`` model) an image-only warm-up comes first: the vision
tower and projector learn to tell the training identities apart (a linear identity head on the mean image
token, with geometric and colour augmentation), the analogue of a real MLLM's pretrained vision encoder.
Then every training example (VQA, text QA, utility) goes through the one engine; text-only and utility
examples are repeated ``oversample_text`` times because each person has far more VQA pairs than text pairs.

With ``exclude_forget`` the same recipe (steps, seed, schedule) runs without a forget set's training examples:
the retrained *oracle* that verification compares an unlearned model with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmunlearn.data.batches import BatchStream, ImageCache
from mmunlearn.data.schema import KINDS, Benchmark, Example
from mmunlearn.errors import ConfigError
from mmunlearn.models.base import ModelAdapter
from mmunlearn.train.engine import Engine, LoraOptions, OptimConfig


@dataclass
class FinetuneConfig:
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    group_lr: dict[str, float] = field(default_factory=lambda: {"vision": 1e-4})
    scheduler: str = "cosine"
    warmup_steps: int = 20
    weight_decay: float = 0.0
    trainable: tuple[str, ...] = ("vision", "projector", "language")
    lora: LoraOptions | None = None
    oversample_text: int = 4
    vision_warmup_steps: int = 600
    vision_warmup_lr: float = 1e-3
    vision_warmup_batch: int = 64
    seed: int = 0
    log_every: int = 50
    save_every: int = 0  # > 0: a checkpoint directory every N steps under <out>/checkpoints/
    # the oracle ("never saw them"): the same recipe and seed without the training examples of these
    # entities (a forget-set name or a list of entity ids), of the kinds in exclude_kinds
    exclude_forget: str | list[str] | None = None
    exclude_kinds: tuple[str, ...] = ("vqa", "qa")

    def __post_init__(self) -> None:
        self.optim()  # validate groups, learning rate and steps before any work starts
        if self.batch_size < 1 or self.oversample_text < 1 or self.vision_warmup_steps < 0:
            raise ConfigError("batch_size and oversample_text must be >= 1, vision_warmup_steps >= 0")
        if not self.exclude_kinds or any(k not in KINDS for k in self.exclude_kinds):
            raise ConfigError(f"exclude_kinds must name some of {KINDS}, got {self.exclude_kinds}")

    def optim(self) -> OptimConfig:
        return OptimConfig(
            lr=self.lr, group_lr=self.group_lr, weight_decay=self.weight_decay, scheduler=self.scheduler,
            warmup_steps=self.warmup_steps, max_steps=self.steps, trainable=self.trainable, lora=self.lora,
        )


def excluded_entities(bench: Benchmark, exclude: str | list[str] | None) -> set[str]:
    """The entities an oracle run leaves out: a forget set by name, or explicit entity ids (checked)."""
    if exclude is None:
        return set()
    if isinstance(exclude, str):
        return bench.forget_set(exclude)
    known = {e.entity for e in bench.examples}
    bad = sorted(set(exclude) - known)
    if bad:
        raise ConfigError(f"exclude_forget: entities {bad} are not in the benchmark {bench.root}")
    return set(exclude)


def training_examples(
    bench: Benchmark, oversample_text: int = 1, exclude: set[str] | None = None, exclude_kinds: tuple[str, ...] = KINDS,
) -> list[Example]:
    """Every training example, text and utility ones repeated; ``exclude`` drops those entities' examples of
    ``exclude_kinds`` (the oracle's recipe)."""
    exclude = exclude or set()
    train = [e for e in bench.examples
             if e.purpose == "train" and not (e.entity in exclude and e.kind in exclude_kinds)]
    extra = [e for e in train if e.kind == "qa" or e.split == "utility"]
    return train + extra * max(0, oversample_text - 1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation (±15°), scale, shift and per-channel gain/offset of a (B, 3, H, W) batch."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * 0.26
    sc = 0.85 + 0.3 * torch.rand(n, generator=g)
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.15
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    gain = 0.8 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    return x * gain + (torch.rand(n, 3, 1, 1, generator=g) * 0.4 - 0.2)


def vision_warmup(
    adapter: ModelAdapter, bench: Benchmark, examples: list[Example], cfg: FinetuneConfig, progress: bool = True
) -> float:
    """Identity classification of the training images through vision tower + projector; returns final loss."""
    images = ImageCache(bench)
    pairs = sorted({(e.image, e.entity) for e in examples if e.image is not None})
    if not pairs or cfg.vision_warmup_steps <= 0:
        return math.nan
    classes = sorted({ent for _, ent in pairs})
    first = {e.image: e for e in examples if e.image is not None}
    pix = adapter.processor.image_processor([images.get(first[im]) for im, _ in pairs], return_tensors="pt")
    pixel_values = pix["pixel_values"]
    if pixel_values.dim() != 4:
        raise ConfigError(
            f"vision warm-up needs (B, 3, H, W) pixel values; family {adapter.family!r} has none: "
            "set vision_warmup_steps=0 (real checkpoints arrive with a pretrained vision encoder)"
        )
    y = torch.tensor([classes.index(ent) for _, ent in pairs])
    model = adapter.model
    dev = next(model.parameters()).device
    params = [p for n, p in model.named_parameters() if adapter.group_of(n) in ("vision", "projector")]
    hidden = adapter.image_features({"pixel_values": pixel_values[:1].to(dev)})[0].shape[-1]
    g = torch.Generator().manual_seed(cfg.seed)
    head = torch.nn.Linear(hidden, len(classes)).to(dev)
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=cfg.vision_warmup_lr)
    model.train()
    loss = torch.tensor(math.nan)
    for _ in tqdm(range(cfg.vision_warmup_steps), desc="vision warm-up", leave=False, disable=not progress):
        idx = torch.randint(0, len(y), (min(cfg.vision_warmup_batch, len(y)),), generator=g)
        x = augment(pixel_values[idx], g).to(dev)
        feats = torch.stack([f.mean(0) for f in adapter.image_features({"pixel_values": x})])
        loss = F.cross_entropy(head(feats), y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def ce_loss(adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only (labels are -100 elsewhere)."""
    batch = adapter.to_device(batch)
    batch.pop("answer_start", None)
    return adapter.model(**batch).loss


def finetune(
    adapter: ModelAdapter, bench: Benchmark, cfg: FinetuneConfig, progress: bool = True,
    checkpoint: Callable[[int], None] | None = None,
) -> dict:
    """Train in place; returns a log (times, losses) for the run record. ``checkpoint(step)`` saves one."""
    t0 = time.time()
    excluded = excluded_entities(bench, cfg.exclude_forget)
    examples = training_examples(bench, cfg.oversample_text, excluded, cfg.exclude_kinds)
    warm_loss = vision_warmup(adapter, bench, examples, cfg, progress)
    t_warm = time.time() - t0
    engine = Engine(adapter, cfg.optim(), seed=cfg.seed)
    stream = BatchStream(adapter, examples, ImageCache(bench), cfg.batch_size, seed=cfg.seed)
    history = []
    bar = tqdm(range(cfg.steps), desc="fine-tune", disable=not progress)
    for step in bar:
        logs = engine.step(lambda: (ce_loss(adapter, next(stream)), {}))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": logs["loss"]})
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
        if checkpoint is not None and cfg.save_every > 0 and (step + 1) % cfg.save_every == 0:
            checkpoint(step + 1)
    adapter.model.eval()
    return {
        "vision_warmup_seconds": round(t_warm, 1), "vision_warmup_loss": warm_loss,
        "train_seconds": round(time.time() - t0, 1), "history": history, "num_examples": len(examples),
        "excluded_entities": sorted(excluded),
    }
