"""Vanilla fine-tuning: teach a model the whole benchmark (visual and textual) so unlearning has a target.

For a randomly initialised vision tower (the ``tiny`` model) an image-only warm-up comes first: the vision
tower and projector learn to tell the training identities apart (a linear identity head on the mean image
token, with geometric and colour augmentation), the analogue of a real MLLM's pretrained vision encoder. It
also sees the benchmark's question-free views of those identities if it has any, and then grows with their
number; without them it is fixed unless ``vision_warmup_power`` makes it grow too (telling more people apart on
views no training showed takes more than proportionally more steps when each person has a few training views).
A model whose projector is new (the ``smol`` model: pretrained encoder and LM, random projector) first gets a
projector-only alignment (``align_steps``, LLaVA's stage 1) on the benchmark's image-text training pairs.
Then every training example (VQA, text QA, utility) goes through the one engine; text-only and utility
examples are repeated ``oversample_text`` times because each person has far more VQA pairs than text pairs, and
images are augmented afresh at every step (``augment_images``), so that the answers hang on the person rather
than on one view's background and light. The learning rate is 5e-4: at 1e-3 the tiny model learnt the facts of
120 or 160 people only after a long plateau, and not within 12 epochs (docs/builtin.md).
With a ``Checkpointer`` the run saves every ``save_every`` steps and on SIGTERM / Ctrl-C, and continues from
its latest checkpoint (the warm-up is not repeated: what it changed outside the engine is in the checkpoint).

The main stage is sized by the benchmark: up to ``epochs`` passes over the examples, stopped early once the
model answers a fixed sample of training examples (VQA and QA alike) right by greedy teacher forcing
(``stop_accuracy``): text-only facts are the slow part, and how many passes they need grows with the number of
people (docs/builtin.md). With several processes every rank scores the same sample and rank 0 decides.

With ``exclude_forget`` the same recipe (length, stopping rule, seed, schedule) runs without a forget set's
training examples: the retrained *oracle* that verification compares an unlearned model with.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmunlearn import distributed as D
from mmunlearn.checkpoint import Checkpointer
from mmunlearn.data.batches import BatchStream, ImageCache, open_image, to_items
from mmunlearn.data.schema import KINDS, Benchmark, Example
from mmunlearn.errors import ConfigError
from mmunlearn.methods import answer_states as AS
from mmunlearn.models.base import ModelAdapter
from mmunlearn.train.engine import Engine, LoraOptions, OptimConfig


@dataclass
class FinetuneConfig:
    # the main stage's length: ``steps`` when > 0, else ``epochs`` passes over the training examples (sized by
    # the benchmark: ceil(epochs * examples / batch_size)); early stopping (below) may end it sooner
    steps: int = 0
    batch_size: int = 16
    lr: float = 5e-4
    group_lr: dict[str, float] = field(default_factory=lambda: {"vision": 1e-4})
    scheduler: str = "cosine"
    warmup_steps: int = 20
    weight_decay: float = 0.0
    trainable: tuple[str, ...] = ("vision", "projector", "language")
    lora: LoraOptions | None = None
    oversample_text: int = 3
    # the warm-up's length up to ``vision_warmup_identities`` people, growing beyond as (people / that) **
    # ``vision_warmup_power`` on the default layout (0: fixed), and linearly where the benchmark has
    # question-free identity views (opt-in ``identity_views``: 92-97 % of held-out views named at 40-160 people).
    # docs/builtin.md: on six training views per person 600 steps named 87 % of held-out views at 40 people and
    # 77 % at 80, 2,400 steps 90 % at 80; at the earlier lr 1e-3 power 2 lifted the 80-person model's test VQA
    # from 90.3 to 94.4 % but cost MMUnlearner's defaults their forgetting at 60 people; augmenting the main
    # stage's images (``augment_images``) is what brought it to 98.6 %, with the fixed 600 steps
    vision_warmup_steps: int = 600
    vision_warmup_identities: int = 40
    vision_warmup_power: float = 0.0
    vision_warmup_lr: float = 1e-3
    vision_warmup_batch: int = 64
    # the main stage's images augmented as in the warm-up (rotation, scale, shift, colour), drawn afresh each step
    augment_images: bool = True
    seed: int = 0
    log_every: int = 50
    save_every: int = 200  # a resumable checkpoint every N steps (0 = only on SIGTERM / Ctrl-C)
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: "stop" (nothing saved) or "skip" the step
    # batch_size is the examples per optimisation step over all processes; each step splits them into
    # processes × gradient_accumulation equal micro-batches (docs/distributed.md)
    gradient_accumulation: int = 1
    fsdp: bool = False  # shard the model over the processes (FSDP2; docs/distributed.md)
    # the oracle ("never saw them"): the same recipe and seed without the training examples of these
    # entities (a forget-set name or a list of entity ids), of the kinds in exclude_kinds
    exclude_forget: str | list[str] | None = None
    exclude_kinds: tuple[str, ...] = ("vqa", "qa")
    # projector-only alignment before the main stage (LLaVA's stage 1) on the image training examples
    align_steps: int = 0
    align_lr: float = 1e-3
    epochs: float = 12.0
    # early stopping: every ``stop_every`` epochs, the main stage stops once greedy teacher-forced answers are
    # entirely right on at least this fraction of a fixed sample of training examples, VQA and QA alike
    # (0 = off; ``epochs`` or ``steps`` is then the most it trains)
    stop_accuracy: float = 0.98
    stop_every: float = 0.5
    stop_sample: int = 256  # training examples per kind in the check (distinct, drawn with the seed)

    def __post_init__(self) -> None:
        if self.align_steps < 0 or self.align_lr <= 0 or self.epochs < 0 or self.steps < 0:
            raise ConfigError("align_steps, steps and epochs must be >= 0 and align_lr > 0")
        if self.steps == 0 and self.epochs == 0:
            raise ConfigError("set steps or epochs (> 0): the length of the main fine-tuning stage")
        if not 0 <= self.stop_accuracy <= 1 or self.stop_every <= 0 or self.stop_sample < 1:
            raise ConfigError("stop_accuracy must lie in [0, 1], stop_every be > 0 and stop_sample >= 1")
        self.optim()  # validate groups, learning rate and steps before any work starts
        if self.batch_size < 1 or self.oversample_text < 1 or self.vision_warmup_steps < 0:
            raise ConfigError("batch_size and oversample_text must be >= 1, vision_warmup_steps >= 0")
        if self.vision_warmup_identities < 1 or self.vision_warmup_power < 0:
            raise ConfigError("vision_warmup_identities must be >= 1 and vision_warmup_power >= 0, got "
                              f"{self.vision_warmup_identities} and {self.vision_warmup_power}")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0, got {self.save_every}")
        if not self.exclude_kinds or any(k not in KINDS for k in self.exclude_kinds):
            raise ConfigError(f"exclude_kinds must name some of {KINDS}, got {self.exclude_kinds}")

    def optim(self, steps: int | None = None) -> OptimConfig:
        return OptimConfig(
            lr=self.lr, group_lr=self.group_lr, weight_decay=self.weight_decay, scheduler=self.scheduler,
            warmup_steps=self.warmup_steps, max_steps=steps or self.steps or 1, trainable=self.trainable,
            lora=self.lora,
            on_nonfinite=self.on_nonfinite, gradient_accumulation=self.gradient_accumulation, fsdp=self.fsdp,
            micro_batch=max(1, self.batch_size // (D.world() * max(1, self.gradient_accumulation))),
        )

    def warmup_steps_for(self, people: int, power: float | None = None) -> int:
        """Vision warm-up steps for ``people`` identities (sized as documented above; ``power`` overrides
        ``vision_warmup_power``)."""
        if self.vision_warmup_steps <= 0:
            return 0
        power = self.vision_warmup_power if power is None else power
        return math.ceil(self.vision_warmup_steps * max(1.0, people / self.vision_warmup_identities) ** power - 1e-9)

    def main_steps(self, num_examples: int) -> int:
        """Steps of the main stage: ``steps``, or ``epochs`` passes over ``num_examples``."""
        if self.steps > 0:
            return self.steps
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))


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


def augment_draws(n: int, g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random rotation (±15°), scale and shift (an affine ``theta``) and per-channel gain and offset for ``n``
    images, drawn on the CPU from ``g`` or torch's global generator (which checkpoints save)."""
    ang = (torch.rand(n, generator=g) * 2 - 1) * 0.26
    sc = 0.85 + 0.3 * torch.rand(n, generator=g)
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.15
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    gain = 0.8 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    return theta, gain, torch.rand(n, 3, 1, 1, generator=g) * 0.4 - 0.2


def apply_augment(x: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A (B, 3, H, W) batch transformed by B of ``augment_draws``'s draws, on ``x``'s device and dtype."""
    theta, gain, offset = (v.to(x.device, x.dtype) for v in draws)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False) * gain + offset


def augment(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """A (B, 3, H, W) batch with fresh random geometric and colour augmentation (``augment_draws``)."""
    return apply_augment(x, augment_draws(x.shape[0], g))


@dataclass
class Warmup:
    """What the vision warm-up did: its final loss, its steps, and its identity head over ``classes`` (read by
    ``bench/warmup_probe.py`` to measure how well the warmed tower tells held-out views apart)."""

    loss: float = math.nan
    steps: int = 0
    head: torch.nn.Linear | None = None
    classes: list[str] = field(default_factory=list)


def warmup_features(adapter: ModelAdapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """The warm-up's image feature: the mean of the projected image tokens, in float32 (the identity head's
    dtype, also when the model computes in bfloat16)."""
    return torch.stack([f.mean(0) for f in adapter.image_features({"pixel_values": pixel_values})]).float()


def vision_warmup(
    adapter: ModelAdapter, bench: Benchmark, examples: list[Example], cfg: FinetuneConfig, progress: bool = True
) -> Warmup:
    """Identity classification of the training images (and the benchmark's question-free views of the same
    identities) through vision tower + projector."""
    images = ImageCache(bench)
    labelled = sorted({(e.image, e.entity) for e in examples if e.image is not None})
    if not labelled or cfg.vision_warmup_steps <= 0:
        return Warmup()
    first = {e.image: e for e in examples if e.image is not None}
    pairs = [(images.get(first[im]), ent) for im, ent in labelled]
    classes = sorted({ent for _, ent in pairs})
    # the benchmark's question-free views of the same identities (none of an oracle's excluded entities: they
    # have no image example here, so no class)
    views = {ent: v for ent, v in bench.identity_views().items() if ent in classes and v}
    pairs += [(open_image(p), ent) for ent, paths in sorted(views.items()) for p in paths]
    # grows with the people (not the utility shapes); linearly where question-free views add images per person
    people = {ent for im, ent in labelled if first[im].split != "utility"}
    steps = cfg.warmup_steps_for(len(people), 1.0 if views else None)
    pix = adapter.processor.image_processor([im for im, _ in pairs], return_tensors="pt")
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
    for _ in tqdm(range(steps), desc="vision warm-up", leave=False, disable=not progress):
        idx = torch.randint(0, len(y), (min(cfg.vision_warmup_batch, len(y)),), generator=g)
        x = augment(pixel_values[idx], g).to(dev)
        loss = F.cross_entropy(head(warmup_features(adapter, x)), y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return Warmup(float(loss.detach()), steps, head, classes)


def align_projector(
    adapter: ModelAdapter, bench: Benchmark, examples: list[Example], cfg: FinetuneConfig, progress: bool = True
) -> float:
    """Projector-only training on the image examples (answer cross-entropy): the new projector learns to map
    the pretrained encoder's features into the LM's input space before the LM itself moves. Returns the final
    loss (nan when there is nothing to do)."""
    images = [e for e in examples if e.image is not None]
    if cfg.align_steps <= 0 or not images:
        return math.nan
    main = cfg.optim()
    engine = Engine(adapter, OptimConfig(lr=cfg.align_lr, scheduler="constant", max_steps=cfg.align_steps,
                                         trainable=("projector",), gradient_accumulation=main.gradient_accumulation,
                                         micro_batch=main.micro_batch), seed=cfg.seed)  # unsharded: a projector
    stream = BatchStream(adapter, images, ImageCache(bench), cfg.batch_size, seed=cfg.seed + 1)
    loss = math.nan
    for _ in tqdm(range(cfg.align_steps), desc="align projector", leave=False, disable=not progress):
        loss = engine.step(micro_steps(adapter, stream, cfg.gradient_accumulation))["loss"]
    del engine  # its optimizer state; the main stage builds its own
    return float(loss)


def ce_loss(adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only (labels are -100 elsewhere), with the LM head at
    answer positions only (``methods/answer_states.py``)."""
    return AS.ce(AS.from_batch(adapter, batch))


def augmented(batch: dict[str, torch.Tensor], draws: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The batch with its images augmented by ``draws`` (one per image); unchanged without (B, 3, H, W) pixel
    values."""
    pv = batch.get("pixel_values")
    if pv is None or pv.dim() != 4:
        return batch
    if pv.shape[0] != draws[0].shape[0]:
        raise ConfigError(f"augment_images: {pv.shape[0]} images in a micro-batch of {draws[0].shape[0]} image "
                          "examples (one image per example expected); set augment_images=false")
    return {**batch, "pixel_values": apply_augment(pv, draws)}


def micro_steps(adapter: ModelAdapter, stream: BatchStream, accumulation: int, augment_images: bool = False) -> list:
    """The step's closures: this process's micro-batches of the stream's next batch (one closure, the whole
    batch, on one process without accumulation). With ``augment_images`` the whole batch's augmentation is drawn
    once per step and sliced, so that every split between processes and accumulation trains on the same images
    (every process draws the same: their generators are seeded alike and draw alike)."""
    examples = stream.next_examples()
    slices = D.micro_slices(len(examples), accumulation, "a fine-tuning batch")
    # draw i belongs to the batch's i-th image example, so a micro-batch's images take a contiguous run of draws
    # (on one process without accumulation: the draws, in order, of augmenting the batch's images at once)
    has_image = [e.image is not None for e in examples] if augment_images else []
    draws = augment_draws(sum(has_image)) if augment_images else None

    def closure(s: slice):
        batch = adapter.encode(to_items(examples[s], stream.images))
        if draws is not None:
            first = sum(has_image[:s.start])
            batch = augmented(batch, tuple(d[first:first + sum(has_image[s])] for d in draws))
        return ce_loss(adapter, batch), {}

    return [lambda s=s: closure(s) for s in slices]


def stop_sample(examples: list[Example], per_kind: int, seed: int) -> dict[str, list[Example]]:
    """The early-stopping check's fixed sample: up to ``per_kind`` distinct training examples of each kind."""
    rng = random.Random(seed)
    out = {}
    for kind in KINDS:
        pool = sorted({e.id: e for e in examples if e.kind == kind}.values(), key=lambda e: e.id)
        if pool:
            out[kind] = rng.sample(pool, min(per_kind, len(pool)))
    return out


@torch.no_grad()
def answer_accuracy(adapter: ModelAdapter, examples: list[Example], images: ImageCache, batch_size: int) -> float:
    """Fraction of examples whose every answer token is the greedy next token under teacher forcing (the answer
    the model would generate, end of turn included): training accuracy, higher = better fitted."""
    was_training = adapter.model.training
    adapter.model.eval()
    right = 0
    for lo in range(0, len(examples), batch_size):
        part = examples[lo:lo + batch_size]
        st = AS.from_batch(adapter, adapter.encode(to_items(part, images)))
        size = st.chunk_size(AS.vocab_size(st))  # the losses' chunks: no (positions, V) tensor beyond one
        ok = torch.cat([st.logits(a, min(st.n, a + size)).argmax(-1) == st.targets[a:a + size]
                        for a in range(0, st.n, size)])
        wrong = torch.zeros(st.batch_size, dtype=torch.long, device=ok.device).index_add(0, st.rows, (~ok).long())
        right += int((wrong == 0).sum())
    adapter.model.train(was_training)
    return right / max(1, len(examples))


def finetune(
    adapter: ModelAdapter, bench: Benchmark, cfg: FinetuneConfig, progress: bool = True,
    checkpoints: Checkpointer | None = None,
) -> dict:
    """Train in place; returns a log (times, losses) for the run record.

    With ``checkpoints``, training continues from its latest checkpoint (if any) and saves new ones.
    """
    t0, cpu0 = time.time(), time.process_time()
    excluded = excluded_entities(bench, cfg.exclude_forget)
    examples = training_examples(bench, cfg.oversample_text, excluded, cfg.exclude_kinds)
    resuming = checkpoints is not None and checkpoints.latest() is not None
    warm = Warmup() if resuming else vision_warmup(adapter, bench, examples, cfg, progress)
    warm_loss, warm_steps = warm.loss, warm.steps
    t_warm = time.time() - t0
    align_loss = math.nan if resuming else align_projector(adapter, bench, examples, cfg, progress)
    t_align = time.time() - t0 - t_warm
    steps = cfg.main_steps(len(examples))
    engine = Engine(adapter, cfg.optim(steps), seed=cfg.seed)
    stream = BatchStream(adapter, examples, ImageCache(bench), cfg.batch_size, seed=cfg.seed)
    # the warm-up and the alignment moved vision and projector weights the engine may not train: checkpoints
    # carry them too
    warmed = {} if cfg.vision_warmup_steps <= 0 and cfg.align_steps <= 0 else {
        engine.base_name(n): p for n, p in engine.model.named_parameters()
        if not p.requires_grad and adapter.group_of(engine.base_name(n)) in ("vision", "projector")
    }
    history, start, checks = [], 0, []
    check = stop_sample(examples, cfg.stop_sample, cfg.seed) if cfg.stop_accuracy > 0 else {}
    every = max(1, round(cfg.stop_every * len(examples) / cfg.batch_size))
    stopped = None
    ck = checkpoints.load() if resuming else None  # also restores the random generators
    if ck is not None:
        with torch.no_grad():
            for name, p in warmed.items():
                p.copy_(ck.tensors[name].to(p.device, p.dtype))
        engine.load_state_dict(ck.engine)
        stream.load_state_dict(ck.state["streams"]["train"])
        history, start, warm_loss = ck.state["history"], ck.step, ck.state["vision_warmup_loss"]
        warm_steps = ck.state.get("vision_warmup_steps", 0)
        checks = ck.state.get("stop_checks", [])
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="fine-tune", disable=not progress)
    with checkpoints.signals() if checkpoints is not None else nullcontext():
        for step in bar:
            logs = engine.step(micro_steps(adapter, stream, cfg.gradient_accumulation, cfg.augment_images))
            if step % cfg.log_every == 0 or step == steps - 1:
                history.append({"step": step, "loss": logs["loss"] if math.isfinite(logs["loss"]) else None})
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if check and (step + 1) % every == 0 and step + 1 < steps:
                acc = {k: round(answer_accuracy(adapter, ex, stream.images, 64), 4) for k, ex in check.items()}
                checks.append({"step": step + 1, **acc})
                if D.broadcast_object(min(acc.values()) >= cfg.stop_accuracy):
                    stopped = step + 1
            if checkpoints is not None and not stopped and checkpoints.due(step + 1, steps):
                state = {"streams": {"train": stream.state_dict()}, "history": history,
                         "vision_warmup_loss": warm_loss, "vision_warmup_steps": warm_steps, "stop_checks": checks}
                checkpoints.save(step + 1, engine.state_dict(), state, tensors=warmed)
                checkpoints.stop_if_requested(step + 1, steps)
            if stopped:
                if history[-1]["step"] != step:
                    history.append({"step": step, "loss": logs["loss"] if math.isfinite(logs["loss"]) else None})
                break
    adapter.model.eval()
    return {
        "vision_warmup_seconds": round(t_warm, 1), "vision_warmup_loss": warm_loss, "vision_warmup_steps": warm_steps,
        "align_seconds": round(t_align, 1), "align_loss": align_loss, "steps": stopped or steps, "max_steps": steps,
        "stopped_early_at": stopped, "stop_checks": checks,
        "train_seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
        "threads": torch.get_num_threads(), "history": history, "num_examples": len(examples),
        "skipped_steps": list(engine.skipped), "resumed_at_step": start if ck is not None else None,
        "excluded_entities": sorted(excluded),
    }
