"""MMUnlearner (Huo et al. 2025): saliency-masked gradient ascent on forget VQA, interleaved with unmasked
descent on retain VQA.

Preparation: importance F of every linear-layer weight entry on forget VQA, retain VQA and textual QA (text-only
questions about ALL entities, targets included), fp32; masks per group, M = 1[(F_f + ε)/(F_p + ε) ≥ γ]:

* ``vision`` (vision tower + projector): preserve set = retain VQA;
* ``language`` (language model): preserve set = textual QA ∪ retain VQA.

Training: iterate over retain batches; every k-th iteration (k = ⌊#retain batches / #forget batches⌋) a forget
step with loss −CE(forget VQA) under the mask, then every iteration a retain step with CE(retain), unmasked.

Corrected by default (the released behaviour behind ``mask_mode: gradient``): the engine's ``update`` mode
makes the mask a true constraint — entries outside it (and parameters of unmasked groups, biases, norms,
embeddings) do not move in a forget step, AdamW moments included. With LoRA the entry-wise mask cannot be
applied to the adapters as such: the run stops with a ConfigError unless ``lora_mask: rows`` maps it
explicitly (see ``MMUnlearnerOptions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmunlearn.data.batches import BatchStream
from mmunlearn.errors import ConfigError
from mmunlearn.methods import saliency as S
from mmunlearn.methods.base import Batches, Context, Method, Step, batch_ce, count_steps, register
from mmunlearn.outputs import write_json

MASK_GROUPS = {"vision": ("vision", "projector"), "language": ("language",)}
MASK_FILE, STATS_FILE = "masks.safetensors", "mask_stats.json"


@dataclass
class MMUnlearnerOptions:
    """Options of MMUnlearner.

    groups: which mask groups exist: ``vision`` (vision tower + projector) and/or ``language``. In the forget
        step only masked entries of these groups move (``update`` mode); the official README's default is
        ``language`` only.
    gamma, eps: the mask threshold M = 1[(F_f + eps)/(F_p + eps) >= gamma].
    importance_batches: batches per data set scored for F (0 = all of them).
    interval: k, a forget step every k retain iterations (0 = ⌊#retain batches / #forget batches⌋).
    mask_mode: ``update`` (true constraint, default) or ``gradient`` (the released code: the gradient is
        multiplied by the mask, parameters without a mask take the full ascent gradient, AdamW momentum moves
        masked entries).
    masks_path: reuse masks saved by an earlier run (``masks.safetensors``) instead of computing them.
    lora_mask: with LoRA, ``error`` (default: stop with a ConfigError) or ``rows``: in a forget step lora_A is
        frozen and row i of lora_B moves only if at least ``row_threshold`` of row i of the base weight's mask
        is selected, so base-weight rows outside the mapped mask stay exactly unchanged (a row-level
        approximation of the entry-wise mask).
    """

    groups: tuple[str, ...] = ("vision", "language")
    gamma: float = S.GAMMA
    eps: float = S.EPS
    importance_batches: int = 8
    interval: int = 3
    mask_mode: str = "update"
    masks_path: str | None = None
    lora_mask: str = "error"
    row_threshold: float = 0.5

    def __post_init__(self) -> None:
        bad = [g for g in self.groups if g not in MASK_GROUPS]
        if bad or not self.groups:
            raise ConfigError(f"mmunlearner option groups must name some of {list(MASK_GROUPS)}, got {self.groups}")
        if self.gamma <= 0 or self.eps < 0:
            raise ConfigError("mmunlearner options gamma must be > 0 and eps >= 0")
        if self.importance_batches < 0 or self.interval < 0:
            raise ConfigError("mmunlearner options importance_batches and interval must be >= 0")
        if self.mask_mode not in ("update", "gradient"):
            raise ConfigError(f"mmunlearner option mask_mode must be 'update' or 'gradient', got {self.mask_mode!r}")
        if self.lora_mask not in ("error", "rows"):
            raise ConfigError(f"mmunlearner option lora_mask must be 'error' or 'rows', got {self.lora_mask!r}")
        if not 0 < self.row_threshold <= 1:
            raise ConfigError(f"mmunlearner option row_threshold must lie in (0, 1], got {self.row_threshold}")


@register("mmunlearner")
class MMUnlearner(Method):
    Options = MMUnlearnerOptions
    uses_retain = True
    # tuned on the built-in benchmark's tiny model (paper: lr 1e-5, batch 4, 1 epoch, retain VQA only)
    defaults = {
        "epochs": 0.5, "lr": 1e-3, "group_lr": {"language": 3e-4}, "batch_size": 8, "retain_kinds": ("vqa", "qa"),
    }

    def __init__(self, options: MMUnlearnerOptions | None = None) -> None:
        super().__init__(options)
        self.masks: dict[str, torch.Tensor] = {}
        self._engine_masks: dict[str, torch.Tensor] | None = None

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
        names = [n for n, p in a.model.named_parameters() if group_of[n] in masked_groups and S.maskable(n, p)]
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
            self.masks = self._compute(ctx, names, group_of)
        dev = next(a.model.parameters()).device
        self.masks = {n: m.to(dev) for n, m in self.masks.items()}
        S.save_masks(self.masks, ctx.out_dir / MASK_FILE)
        write_json(ctx.out_dir / STATS_FILE, S.mask_stats(self.masks, group_of))
        ctx.artefacts.update({"masks": MASK_FILE, "mask_stats": STATS_FILE})

    def _compute(self, ctx: Context, names: list[str], group_of: dict[str, str]) -> dict[str, torch.Tensor]:
        a, b = ctx.adapter, ctx.bench
        fset = ctx.forget_entities
        text = [e for s in ("forget", "retain") for e in b.select(s, fset, purpose="train", kind="qa")]
        sets = {
            "forget VQA": [e for e in ctx.forget_data if e.kind == "vqa"],
            "retain VQA": b.select("retain", fset, purpose="train", kind="vqa"),
        }
        if "language" in self.opt.groups:
            sets["textual QA"] = text
        scores = {}
        for i, (label, examples) in enumerate(sets.items()):
            if not examples:
                raise ConfigError(f"mmunlearner: the {label} set is empty; the saliency mask needs it")
            stream = BatchStream(a, examples, ctx.images, ctx.batch_size, seed=ctx.seed + i)
            n = len(stream) if not self.opt.importance_batches else min(len(stream), self.opt.importance_batches)
            scores[label] = S.importance(a, (next(stream) for _ in range(n)), names, ctx.progress, label)
        f_forget = scores["forget VQA"][0]
        vision_names = [n for n in names if group_of[n] in MASK_GROUPS["vision"]]
        lang_names = [n for n in names if group_of[n] in MASK_GROUPS["language"]]
        g, e = self.opt.gamma, self.opt.eps
        masks = S.saliency_mask({n: f_forget[n] for n in vision_names}, scores["retain VQA"][0], g, e)
        if lang_names:
            pres_lang = S.combine([scores["textual QA"], scores["retain VQA"]])
            masks.update(S.saliency_mask({n: f_forget[n] for n in lang_names}, pres_lang, g, e))
        return masks

    # ---- schedule and mask -----------------------------------------------------------------------------
    def schedule(self, ctx: Context, steps: int | None, epochs: float | None) -> list[Step]:
        """``steps`` / ``epochs`` count retain iterations; a masked forget step every k-th of them."""
        iterations = count_steps(steps, epochs, ctx.n_retain_batches)
        k = self.opt.interval or max(1, ctx.n_retain_batches // max(1, ctx.n_forget_batches))
        plan: list[Step] = []
        for i in range(iterations):
            if i % k == 0:
                plan.append(Step(forget=True, retain=False, masked=True))
            plan.append(Step(forget=False, retain=True))
        return plan

    def step_mask(self, ctx: Context, step: Step) -> dict[str, torch.Tensor] | None:
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
                rows = self.masks[base].float().mean(1) >= self.opt.row_threshold  # (out,)
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
