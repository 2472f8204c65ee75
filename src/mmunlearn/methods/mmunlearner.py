"""MMUnlearner (Huo et al. 2025): saliency-masked gradient ascent on forget VQA, interleaved with unmasked
descent on retain VQA.

Preparation: importance F of every linear-layer weight entry on forget VQA, retain VQA and textual QA (text-only
questions about ALL entities, targets included), fp32; masks per group, M = 1[(F_f + ε)/(F_p + ε) ≥ γ]:

* ``vision`` (vision tower + projector): preserve set = retain VQA;
* ``language`` (language model): preserve set = textual QA ∪ retain VQA.

Training: iterate over retain batches; every k-th iteration (the paper: k = ⌊#retain batches / #forget batches⌋;
here ``interval`` or ``forget_passes``) a forget step with loss −CE(forget VQA) under the mask, then every iteration
a retain step with CE(retain), unmasked.

Corrected by default (the released behaviour behind ``mask_mode: gradient``): the engine's ``update`` mode
makes the mask a true constraint — entries outside it (and parameters of unmasked groups, biases, norms,
embeddings) do not move in a forget step, AdamW moments included. With LoRA the entry-wise mask cannot be
applied to the adapters as such: the run stops with a ConfigError unless ``lora_mask: rows`` maps it
explicitly (see ``MMUnlearnerOptions``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mmunlearn import distributed as D
from mmunlearn.data.batches import BatchStream, to_items
from mmunlearn.errors import ConfigError
from mmunlearn.methods import saliency as S
from mmunlearn.methods.base import Batches, Context, Method, Step, batch_ce, count_steps, register
from mmunlearn.outputs import write_json
from mmunlearn.train.masks import PackedMask

MASK_GROUPS = {"vision": ("vision", "projector"), "language": ("language",)}
MASK_FILE, STATS_FILE = "masks.safetensors", "mask_stats.json"
SPARSE_ABOVE = 1_000_000_000  # parameters; above, dense AdamW state for every entry no longer fits one GPU


@dataclass
class MMUnlearnerOptions:
    """Options of MMUnlearner.

    groups: which mask groups exist: ``vision`` (vision tower + projector) and/or ``language``. In the forget
        step only masked entries of these groups move (``update`` mode); the official README's default is
        ``language`` only. Default both; the tiny model's recipe sets ``vision`` (see ``defaults``).
    gamma, eps: the mask threshold M = 1[(F_f + eps)/(F_p + eps) >= gamma].
    importance_batches: batches per data set scored for F (0 = all of them).
    interval: k, a forget step every k retain iterations (0 = ⌊#retain batches / (#forget batches ×
        forget_passes)⌋, at least 1).
    forget_passes: with ``interval`` 0, the passes of ascent over the forget set per epoch (1 = the official
        rule: one forget batch per ⌊#retain / #forget⌋ retain batches). Unlike a fixed k, it gives each forget
        example the same number of ascent steps whatever the ratio of retain to forget data.
    mask_mode: ``update`` (true constraint, default) or ``gradient`` (the released code: the gradient is
        multiplied by the mask, parameters without a mask take the full ascent gradient, AdamW momentum moves
        masked entries).
    masks_path: reuse masks saved by an earlier run (``masks.safetensors``) instead of computing them.
    state: ``dense`` (AdamW state for every trained entry; retain steps update everything, forget steps only
        the masked entries), ``sparse`` (only the masked entries are trainable, in every step, and only they
        have optimizer state: ``train/sparse.py``; what fits a 7B model on one 80 GB GPU), or ``auto``
        (sparse above 1B parameters).
    lora_mask: with LoRA, ``error`` (default: stop with a ConfigError) or ``rows``: in a forget step lora_A is
        frozen and row i of lora_B moves only if at least ``row_threshold`` of row i of the base weight's mask
        is selected, so base-weight rows outside the mapped mask stay exactly unchanged (a row-level
        approximation of the entry-wise mask).
    preserve: the language mask's preserve importance: ``mean`` (default: the batch-weighted mean of textual QA's
        and retain VQA's importances, each scored in batches of its own kind) or ``concat`` (the released code: one
        shuffled set of both, so batches mix text-only and image questions).
    fisher_loop: ``default`` (eval mode, fp32, linear-layer weights only) or ``official`` (the released loop:
        train mode, every parameter of the masked groups scored, one shuffled pass over each set with its last
        partial batch, F += grad²/#batches in the model dtype; masks then kept for names containing
        proj/fc/linear/mlp/qkv whatever their shape).
    """

    groups: tuple[str, ...] = ("vision", "language")
    gamma: float = S.GAMMA
    eps: float = S.EPS
    importance_batches: int = 8
    interval: int = 3
    forget_passes: float = 1.0
    mask_mode: str = "update"
    masks_path: str | None = None
    lora_mask: str = "error"
    row_threshold: float = 0.5
    state: str = "auto"
    preserve: str = "mean"
    fisher_loop: str = "default"

    def __post_init__(self) -> None:
        bad = [g for g in self.groups if g not in MASK_GROUPS]
        if bad or not self.groups:
            raise ConfigError(f"mmunlearner option groups must name some of {list(MASK_GROUPS)}, got {self.groups}")
        if self.gamma <= 0 or self.eps < 0:
            raise ConfigError("mmunlearner options gamma must be > 0 and eps >= 0")
        if self.importance_batches < 0 or self.interval < 0:
            raise ConfigError("mmunlearner options importance_batches and interval must be >= 0")
        if not self.forget_passes > 0:
            raise ConfigError(f"mmunlearner option forget_passes must be > 0, got {self.forget_passes}")
        if self.mask_mode not in ("update", "gradient"):
            raise ConfigError(f"mmunlearner option mask_mode must be 'update' or 'gradient', got {self.mask_mode!r}")
        if self.lora_mask not in ("error", "rows"):
            raise ConfigError(f"mmunlearner option lora_mask must be 'error' or 'rows', got {self.lora_mask!r}")
        if self.state not in ("auto", "dense", "sparse"):
            raise ConfigError(f"mmunlearner option state must be auto, dense or sparse, got {self.state!r}")
        if not 0 < self.row_threshold <= 1:
            raise ConfigError(f"mmunlearner option row_threshold must lie in (0, 1], got {self.row_threshold}")
        if self.preserve not in ("mean", "concat"):
            raise ConfigError(f"mmunlearner option preserve must be 'mean' or 'concat', got {self.preserve!r}")
        if self.fisher_loop not in ("default", "official"):
            raise ConfigError(
                f"mmunlearner option fisher_loop must be 'default' or 'official', got {self.fisher_loop!r}"
            )


@register("mmunlearner")
class MMUnlearner(Method):
    Options = MMUnlearnerOptions
    uses_retain = True
    # tuned on the built-in benchmark's tiny model by a sweep over configurations (docs/builtin.md; paper: lr
    # 1e-5, batch 4, 1 epoch, retain VQA only): only the vision tower and projector are masked and trained, the
    # language model stays the vanilla one. A language mask, or retain steps that train the language model,
    # cost naming retained people on their held-out images at 40-60 people. A forget step every second retain
    # iteration over 4 epochs: at 2 epochs with one every third or every second, 18 forgotten people of 120 kept
    # forget VQA at 53 or 42 %; with one at every iteration, retained people were named on fewer held-out images at
    # 64 and 120 people; the longer run's retain steps keep them named (docs/builtin.md).
    defaults = {
        "epochs": 4.0, "lr": 2.5e-4, "batch_size": 8, "trainable": ("vision", "projector"), "retain_kinds": ("vqa",),
        "method_options": {"groups": ("vision",), "interval": 2},
    }
    # the released scripts: language mask (README), gradient-multiplied mask, mixed preserve set, the SFRon loop,
    # every batch scored, k = ⌊#retain / #forget batches⌋, retain steps on retain VQA only, every parameter trained
    paper_exact = {"groups": ("language",), "mask_mode": "gradient", "preserve": "concat", "fisher_loop": "official",
                   "importance_batches": 0, "interval": 0, "forget_passes": 1.0}
    paper_exact_defaults = {"retain_kinds": ("vqa",), "trainable": ("vision", "projector", "language")}

    def __init__(self, options: MMUnlearnerOptions | None = None) -> None:
        super().__init__(options)
        self.masks: dict[str, PackedMask] = {}
        self._engine_masks: dict[str, PackedMask | torch.Tensor] | None = None

    def mask_mode(self) -> str:
        return self.opt.mask_mode

    # ---- preparation: saliency masks -------------------------------------------------------------------
    def prepare(self, ctx: Context) -> None:
        if ctx.lora:
            if self.opt.lora_mask == "error":
                raise ConfigError(
                    "mmunlearner's saliency mask is entry-wise on full weights and cannot constrain LoRA adapters "
                    "as such; train full parameters (lora: null) or set method_options.lora_mask=rows"
                )
            if self.opt.mask_mode != "update":
                raise ConfigError("mmunlearner with lora_mask=rows needs mask_mode=update")
        a = ctx.adapter
        group_of = {n: a.group_of(n) for n, _ in a.model.named_parameters()}
        masked_groups = {g for name in self.opt.groups for g in MASK_GROUPS[name]}
        untrained = sorted(masked_groups - set(ctx.trainable)) if ctx.trainable and not ctx.lora else []
        if untrained:  # before the saliency scores are computed: the engine would refuse the mask only after
            raise ConfigError(
                f"mmunlearner: method_options.groups={list(self.opt.groups)} masks {untrained}, which this run does "
                f"not train (trainable={list(ctx.trainable)}); add them, e.g. --set "
                f"trainable=[{','.join(sorted(set(ctx.trainable) | masked_groups))}]"
            )
        official = self.opt.fisher_loop == "official"
        names = [n for n, p in a.model.named_parameters()
                 if group_of[n] in masked_groups and (official or S.maskable(n, p))]
        if not names:
            raise ConfigError(f"mmunlearner: no linear-layer weights in groups {self.opt.groups} to mask")
        saved = ctx.out_dir / MASK_FILE
        if self.opt.masks_path or ctx.resume and saved.is_file():
            self.masks = S.load_masks(self.opt.masks_path or saved)
            unknown = [n for n in self.masks if n not in group_of]
            if unknown:
                raise ConfigError(f"{self.opt.masks_path}: masks for unknown parameters, e.g. {unknown[0]!r}")
            self.masks = {n: self.masks[n] for n in names if n in self.masks}  # in parameter order
        else:
            masks = self._compute(ctx, names, group_of)
            if official:
                masks = {n: m for n, m in masks.items() if S.official_maskable(n)}
            self.masks = {n: PackedMask.pack(m) for n, m in masks.items()}
        params = dict(a.model.named_parameters())
        self.masks = {n: m.to(params[n].device) for n, m in self.masks.items()}
        S.save_masks(self.masks, ctx.out_dir / MASK_FILE)
        write_json(ctx.out_dir / STATS_FILE, S.mask_stats(self.masks, group_of))
        ctx.artefacts.update({"masks": MASK_FILE, "mask_stats": STATS_FILE})

    def _compute(self, ctx: Context, names: list[str], group_of: dict[str, str]) -> dict[str, torch.Tensor]:
        b = ctx.bench
        fset = ctx.forget_entities
        text = [e for s in ("forget", "retain") for e in b.select(s, fset, purpose="train", kind="qa")]
        retain_vqa = b.select("retain", fset, purpose="train", kind="vqa")
        concat = self.opt.preserve == "concat"
        sets = {"forget VQA": [e for e in ctx.forget_data if e.kind == "vqa"]}
        if "vision" in self.opt.groups or not concat:
            sets["retain VQA"] = retain_vqa
        if "language" in self.opt.groups:
            sets.update({"language preserve": text + retain_vqa} if concat else {"textual QA": text})
        scores = {label: self._importance(ctx, examples, names, label, ctx.seed + i)
                  for i, (label, examples) in enumerate(sets.items())}
        f_forget = scores["forget VQA"][0]
        vision_names = [n for n in names if group_of[n] in MASK_GROUPS["vision"]]
        lang_names = [n for n in names if group_of[n] in MASK_GROUPS["language"]]
        g, e = self.opt.gamma, self.opt.eps
        masks = {}
        if vision_names:
            masks = S.saliency_mask({n: f_forget[n] for n in vision_names}, scores["retain VQA"][0], g, e)
        if lang_names:
            pres_lang = (scores["language preserve"][0] if concat
                         else S.combine([scores["textual QA"], scores["retain VQA"]]))
            masks.update(S.saliency_mask({n: f_forget[n] for n in lang_names}, pres_lang, g, e))
        return masks

    def _importance(self, ctx: Context, examples: list, names: list[str], label: str, seed: int):
        """F over ``importance_batches`` batches of one set (0 = all): shuffled full batches (default), or one
        shuffled pass including the last partial batch (``fisher_loop: official``, as a DataLoader does)."""
        if not examples:
            raise ConfigError(f"mmunlearner: the {label} set is empty; the saliency mask needs it")
        a, limit = ctx.adapter, self.opt.importance_batches
        if self.opt.fisher_loop == "official":
            order = list(range(len(examples)))
            random.Random(seed).shuffle(order)
            chunks = [order[lo : lo + ctx.batch_size] for lo in range(0, len(order), ctx.batch_size)]
            chunks = chunks[:limit] if limit else chunks
            batches = (a.encode(to_items([examples[i] for i in c], ctx.images)) for c in D.my_batches(chunks))
            return S.importance(a, batches, names, ctx.progress, label, official_batches=len(chunks))
        stream = BatchStream(a, examples, ctx.images, ctx.batch_size, seed=seed)
        n = len(stream) if not limit else min(len(stream), limit)
        drawn = [stream.next_examples() for _ in range(n)]  # several processes: each scores its share
        return S.importance(a, (a.encode(to_items(b, ctx.images)) for b in D.my_batches(drawn)), names,
                            ctx.progress, label)

    # ---- schedule and mask -----------------------------------------------------------------------------
    def schedule(self, ctx: Context, steps: int | None, epochs: float | None) -> list[Step]:
        """``steps`` / ``epochs`` count retain iterations; a masked forget step every k-th of them."""
        iterations = count_steps(steps, epochs, ctx.n_retain_batches)
        k = self.opt.interval or max(
            1, int(ctx.n_retain_batches // (max(1, ctx.n_forget_batches) * self.opt.forget_passes)))
        plan: list[Step] = []
        for i in range(iterations):
            if i % k == 0:
                plan.append(Step(forget=True, retain=False, masked=True))
            plan.append(Step(forget=False, retain=True))
        return plan

    def sparse(self, ctx: Context) -> bool:
        """Whether only the masked entries are trainable (see the ``state`` option)."""
        if self.opt.state == "auto":
            return not ctx.lora and ctx.adapter.num_parameters() > SPARSE_ABOVE
        return self.opt.state == "sparse"

    def trainable_masks(self, ctx: Context) -> dict[str, PackedMask] | None:
        if not self.sparse(ctx):
            return None
        if ctx.lora:
            raise ConfigError("mmunlearner option state=sparse trains full weights' entries; it does not combine "
                              "with LoRA")
        if self.opt.mask_mode != "update":
            raise ConfigError("mmunlearner option state=sparse confines every step to the mask; use mask_mode=update")
        return dict(self.masks)

    def step_mask(self, ctx: Context, step: Step) -> dict[str, torch.Tensor] | None:
        if self.sparse(ctx):
            return None  # every step is already confined to the masked entries
        if self._engine_masks is None:
            self._engine_masks = self._lora_rows(ctx) if ctx.lora else dict(self.masks)
        return self._engine_masks

    def _lora_rows(self, ctx: Context) -> dict[str, torch.Tensor]:
        """Map the entry-wise masks onto lora_B rows (lora_A stays absent, i.e. frozen in the forget step)."""
        out = {}
        for name, p in ctx.engine.model.named_parameters():
            if ".lora_B." not in name or not p.requires_grad:
                continue
            base = ctx.engine.base_name(name.split(".lora_B.")[0]) + ".weight"
            if base in self.masks:
                rows = self.masks[base].unpack().float().mean(1) >= self.opt.row_threshold  # (out,)
                out[name] = rows.to(p.device)[:, None].expand_as(p).clone()
        if not out:
            raise ConfigError(
                "mmunlearner: the saliency mask maps onto no LoRA adapter (LoRA targets and masked groups do not "
                "overlap); put LoRA on the masked groups' linear layers or train full parameters"
            )
        return out

    # ---- loss ------------------------------------------------------------------------------------------
    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        a = ctx.adapter
        if batches.forget is not None:
            ce = batch_ce(a, batches.forget)
            return -ce, {"forget_ce": float(ce.detach())}
        ce = batch_ce(a, batches.retain)
        return ce, {"retain_ce": float(ce.detach())}
