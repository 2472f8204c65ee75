"""The one training engine: vanilla fine-tuning and every unlearning method run through ``Engine.step``.

A step is a closure that returns ``(loss, logs)``; the engine does backward, clipping, an optional
per-parameter update mask, the optimizer and the schedule.

Precision: the model computes in its own dtype (bf16 on a GPU by default). Trainable parameters stored in
bf16/fp16 get fp32 *master* values, which the optimizer updates and the model's weights are rounded from:
bf16 keeps 8 significant bits, so an update below ~2^-9 of a weight (lr 1e-5 on most 7B weights) would
otherwise round away. Only trainable entries have masters (LoRA: the adapters, which PEFT keeps in fp32
anyway). Gradient checkpointing is on by default above ``CHECKPOINT_ABOVE`` parameters.

Mask modes (``mask`` maps parameter names to bool tensors or ``PackedMask``; a name the model does not have is
an error):

* ``"update"`` (default): only masked entries move in that step — values *and* AdamW moments
  (``masks.masked_adamw_step``, in place, chunk by chunk, no clone); parameters absent from the mask are frozen
  for the step. A true constraint even with a shared optimizer.
* ``"gradient"``: the released MMUnlearner behaviour — gradients are clipped, then multiplied by the mask,
  parameters absent from the mask keep their full gradient, and optimizer momentum can still move masked
  entries.

``trainable_masks`` instead makes the masked entries the run's only trainable state, in every step
(``train/sparse.py``: fp32 values and AdamW moments for the selected entries only — what lets a saliency-masked
full-parameter run of a 7B model fit one 80 GB GPU).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from mmunlearn import distributed as D
from mmunlearn.errors import ConfigError, ModelError, NonFiniteError
from mmunlearn.models.base import ModelAdapter
from mmunlearn.train import zero3
from mmunlearn.train.masks import PackedMask, chunk_entries, mask_gradients, masked_adamw_step
from mmunlearn.train.sparse import SparseTrainer

GROUPS = ("vision", "projector", "language")
CHECKPOINT_ABOVE = 1_000_000_000  # parameters; gradient checkpointing on by default above this
# On the CPU, from this many parameters on, AdamW runs fused (one kernel over every tensor): a step over 148M fp32
# parameters took 0.08 s instead of the for-loop's 0.30 s (2 threads), a sixth of a smol training step. Below it
# (the tiny model) the for-loop step stays, the one its documented results come from; GPUs keep torch's default.
FUSED_CPU_FROM = 100_000_000
LOW_PRECISION = (torch.bfloat16, torch.float16)
MaskLike = torch.Tensor | PackedMask
MASTER, SPARSE = "master::", "sparse::"  # keys of fp32 masters and sparse entries in a checkpoint
LOSS = "__loss__"  # the step's loss among the numbers averaged over micro-batches and ranks
StepFn = Callable[[], tuple[torch.Tensor, dict[str, float]]]
MicroSteps = StepFn | Sequence[StepFn]


@dataclass
class LoraOptions:
    """LoRA on the linear layers of the trainable groups (peft)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # module-name suffixes to adapt (e.g. q_proj ... down_proj); default: every nn.Linear inside ``groups``
    target_modules: list[str] | None = None
    # groups that get LoRA; other trainable groups train in full (SIU's recipe: LoRA on the LM, projector
    # fully trained). Default: every trainable group.
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("lora needs r >= 1, alpha > 0 and 0 <= dropout < 1")
        bad = [g for g in self.groups or () if g not in GROUPS]
        if bad:
            raise ConfigError(f"lora.groups: unknown parameter group(s) {bad}; choose from {GROUPS}")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    group_lr: dict[str, float] = field(default_factory=dict)  # per-group learning rate overrides
    weight_decay: float = 0.0
    scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    max_steps: int = 100
    grad_clip: float = 1.0
    trainable: tuple[str, ...] = GROUPS
    lora: LoraOptions | None = None
    mask_mode: str = "update"
    gradient_checkpointing: bool | None = None  # None: on above CHECKPOINT_ABOVE parameters
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: "stop" the run, or "skip" the step
    # micro-batches per optimisation step on each process: the step's batch is split into
    # processes × gradient_accumulation equal parts whose losses are averaged (``distributed.micro_slices``)
    gradient_accumulation: int = 1
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the ranks (``train/fsdp.py``)
    micro_batch: int = 1  # examples per micro-batch: DeepSpeed's train_micro_batch_size_per_gpu (bookkeeping)

    def __post_init__(self) -> None:
        bad = [g for g in (*self.trainable, *self.group_lr) if g not in GROUPS]
        if bad:
            raise ConfigError(f"unknown parameter group(s) {bad}; choose from {GROUPS}")
        if not self.trainable:
            raise ConfigError("trainable must name at least one parameter group")
        if self.mask_mode not in ("update", "gradient"):
            raise ConfigError(f"mask_mode must be 'update' or 'gradient', got {self.mask_mode!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.lr <= 0 or self.max_steps < 1:
            raise ConfigError("lr must be > 0 and max_steps >= 1")
        if self.gradient_accumulation < 1:
            raise ConfigError(f"gradient_accumulation must be >= 1, got {self.gradient_accumulation}")


def linear_module_names(adapter: ModelAdapter, groups: tuple[str, ...], suffixes: list[str] | None = None) -> list[str]:
    """Every nn.Linear inside the groups (optionally only names ending in ``suffixes``), except the output
    head (LoRA on it is unusual and not merge-safe)."""
    return [
        n for n, m in adapter.model.named_modules()
        if isinstance(m, torch.nn.Linear) and adapter.group_of(n + ".weight") in groups and not n.endswith("lm_head")
        and (not suffixes or any(n.split(".")[-1] == x for x in suffixes))
    ]


class MasterWeights:
    """fp32 master values of the low-precision trainable parameters (fp32 parameters are their own master)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.master: dict[torch.nn.Parameter, torch.Tensor] = {}
        for p in params:
            if p.dtype in LOW_PRECISION:
                self.master[p] = p.detach().float().clone().requires_grad_(True)

    def of(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.master.get(p, p)

    def grads_to_master(self) -> None:
        for p, m in self.master.items():
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in self.master.items():
            p.copy_(m)


class Engine:
    def __init__(self, adapter: ModelAdapter, cfg: OptimConfig, seed: int = 0,
                 trainable_masks: dict[str, MaskLike] | None = None) -> None:
        self.adapter, self.cfg = adapter, cfg
        torch.manual_seed(seed)
        self.zero3 = zero3.requested()  # accelerate's DeepSpeed config (``train/zero3.py``)
        # the model trains where the caller placed it, next to any frozen reference the method keeps
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available() and not self.zero3, device_placement=False,
                                       **({"gradient_accumulation_steps": cfg.gradient_accumulation}
                                          if self.zero3 else {}))
        if self.zero3:
            zero3.check(trainable_masks)
        model = adapter.model
        if cfg.lora is not None:
            if trainable_masks is not None:
                raise ConfigError("trainable masks select entries of full weights; they do not combine with LoRA")
            model = self._wrap_lora(adapter, cfg)
        self.model = model
        self.adapter.model = self.model
        if cfg.fsdp or self.launched_as("FSDP"):  # --set fsdp=true, or accelerate's FSDP config
            from mmunlearn.train.fsdp import shard

            if trainable_masks is not None:
                raise ConfigError("fsdp shards whole weights; trainable masks (sparse state) need the dense weights")
            shard(adapter)
        self.sparse: SparseTrainer | None = None
        if trainable_masks is not None:
            param_groups, self.param_group_of = self._sparse_groups(trainable_masks)
            self.masters = MasterWeights([])
        else:
            param_groups, self.param_group_of = self._param_groups()
            # DeepSpeed keeps its own fp32 masters
            self.masters = MasterWeights([] if self.zero3 else [p for g in param_groups for p in g["params"]])
            for g in param_groups:
                g["params"] = [self.masters.of(p) for p in g["params"]]
        self.fused = (self.sparse is None and not self.zero3 and D.world() == 1
                      and all(p.device.type == "cpu" for g in param_groups for p in g["params"])
                      and adapter.num_parameters() >= FUSED_CPU_FROM)
        self.optimizer = self.torch_optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr,
                                                                  weight_decay=cfg.weight_decay,
                                                                  **({"fused": True} if self.fused else {}))
        self.scheduler = get_scheduler(
            cfg.scheduler, self.torch_optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
        )
        self.gradient_checkpointing = self._checkpointing(adapter, cfg)
        # several processes: every rank keeps the whole model and gradients are averaged after the last
        # micro-batch (``distributed.average_gradients``); DDP's wrapper is not used because the losses call
        # the backbone and the LM head separately (answer positions only), which DDP's forward does not see.
        # Under FSDP2 (``train/fsdp.py``) the sharded parameters reduce their own gradients.
        self.sharded = any(type(p).__name__ == "DTensor" for p in self.model.parameters())
        self.replicated = D.world() > 1 and not self.sharded
        if D.world() == 1:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        elif self.zero3:
            zero3.prepare(self)
        self.adapter.model = self.model
        self.model.train()
        self.global_step = 0
        trainable = self.trainable_parameters()
        self.mask_chunk = chunk_entries(sum(p.numel() for p in trainable.values()))
        self._masks: tuple[int, dict[torch.Tensor, PackedMask]] | None = None

    def launched_as(self, kind: str) -> bool:
        """Whether accelerate's configuration asks for this distributed type (FSDP, DEEPSPEED)."""
        return D.world() > 1 and getattr(self.accelerator.distributed_type, "value", None) == kind

    @staticmethod
    def _checkpointing(adapter: ModelAdapter, cfg: OptimConfig) -> bool:
        on = cfg.gradient_checkpointing
        if on is None:
            on = adapter.num_parameters() > CHECKPOINT_ABOVE
        if on:
            adapter.unwrapped().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return bool(on)

    def _wrap_lora(self, adapter: ModelAdapter, cfg: OptimConfig) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        lo = cfg.lora
        groups = tuple(g for g in (lo.groups or cfg.trainable) if g in cfg.trainable)
        targets = linear_module_names(adapter, groups, lo.target_modules)
        if not targets:
            raise ConfigError(f"no linear layers to put LoRA on in groups {groups} (target_modules "
                              f"{lo.target_modules})")
        peft_cfg = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=targets)
        return get_peft_model(adapter.model, peft_cfg)

    def _param_groups(self) -> tuple[list[dict], dict[str, str]]:
        by_group: dict[str, list[torch.nn.Parameter]] = {g: [] for g in GROUPS}
        group_of: dict[str, str] = {}
        lora_groups = () if self.cfg.lora is None else (self.cfg.lora.groups or self.cfg.trainable)
        for name, p in self.model.named_parameters():
            base = self.base_name(name)
            g = self.adapter.group_of(base)
            trainable = g in self.cfg.trainable and (g not in lora_groups or "lora_" in name)
            p.requires_grad_(trainable)
            if trainable:
                by_group[g].append(p)
                group_of[name] = g
        groups = [
            {"params": ps, "lr": self.cfg.group_lr.get(g, self.cfg.lr), "name": g} for g, ps in by_group.items() if ps
        ]
        if not groups:
            raise ConfigError(f"no trainable parameters in groups {self.cfg.trainable}")
        return groups, group_of

    def _sparse_groups(self, masks: dict[str, MaskLike]) -> tuple[list[dict], dict[str, str]]:
        """Optimizer groups over the selected entries' fp32 values, one per parameter group (its lr)."""
        packed: dict[torch.nn.Parameter, PackedMask] = {}
        group_of: dict[str, str] = {}
        for name, m in masks.items():
            full, p = self._parameter(name, m)
            packed[p] = m if isinstance(m, PackedMask) else PackedMask.pack(m.to(p.device).bool())
            group_of[full] = self.adapter.group_of(self.base_name(full))
            if group_of[full] not in self.cfg.trainable:
                raise ConfigError(f"mask names parameter {name!r} of group {group_of[full]!r}, which this run "
                                  f"does not train (trainable: {self.cfg.trainable})")
        self.sparse = SparseTrainer(self.model, packed)
        by_group: dict[str, list[torch.Tensor]] = {}
        for g, entry in zip(group_of.values(), self.sparse.entries):
            by_group.setdefault(g, []).append(entry.master)
        groups = [{"params": ps, "lr": self.cfg.group_lr.get(g, self.cfg.lr), "name": g} for g, ps in by_group.items()]
        return groups, group_of

    def _parameter(self, name: str, mask: MaskLike) -> tuple[str, torch.nn.Parameter]:
        """The model parameter a mask names (its own name, or without the wrappers' prefixes), checked."""
        params = dict(self.model.named_parameters())
        by_base = {self.base_name(n): n for n in params}
        full = name if name in params else by_base.get(name)
        if full is None:
            close = difflib.get_close_matches(name, list(by_base), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"mask names parameter {name!r}, which the model does not have{hint}")
        p = params[full]
        if tuple(mask.shape) != tuple(p.shape):
            raise ConfigError(f"mask of {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
        return full, p

    @staticmethod
    def base_name(name: str) -> str:
        """Parameter name without the wrappers' additions (PEFT, DDP, FSDP, activation checkpointing,
        torch.compile), as the adapter's group prefixes and saved masks know it."""
        for pre in ("module.", "_orig_mod.", "base_model.model."):
            if name.startswith(pre):
                name = name[len(pre) :]
        for part in (".base_layer", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
            name = name.replace(part, "")
        return name

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The model's parameters that receive gradients (with trainable masks: the masked weights)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def resolve_mask(self, mask: dict[str, MaskLike]) -> dict[torch.Tensor, PackedMask]:
        """Map mask names (the model's own, or without PEFT's prefixes) to the optimizer's tensors, packed
        and on each parameter's device. A name that matches no trainable parameter is an error: a mask that
        silently applies to nothing is the bug this guards against."""
        if self.sparse is not None:
            raise ConfigError("this run trains only its trainable masks' entries; a per-step mask adds nothing")
        if self.sharded:
            raise ConfigError("a per-step update mask (MMUnlearner) needs whole weights on every rank; run it data "
                              "parallel (without fsdp), or on one process")
        out: dict[torch.Tensor, PackedMask] = {}
        for name, m in mask.items():
            _, p = self._parameter(name, m)
            if not p.requires_grad:
                raise ConfigError(f"mask names parameter {name!r}, which is not trained in this run")
            packed = m if isinstance(m, PackedMask) else PackedMask.pack(m.to(p.device).bool())
            out[self.masters.of(p)] = packed.to(p.device)
        return out

    def _resolved(self, mask: dict[str, MaskLike]) -> dict[torch.Tensor, PackedMask]:
        """``resolve_mask`` once per mask object (methods pass the same mask at every masked step)."""
        if self._masks is None or self._masks[0] != id(mask):
            self._masks = (id(mask), self.resolve_mask(mask))
        return self._masks[1]

    def step(self, fn: MicroSteps, mask: dict[str, MaskLike] | None = None) -> dict[str, float]:
        """One optimisation step; ``mask`` maps parameter names to the entries allowed to move.

        ``fn`` is one closure, or one per micro-batch of this process (gradient accumulation): their losses
        are averaged, and with several processes the gradients and logged numbers are averaged over the ranks.
        """
        fns = [fn] if callable(fn) else list(fn)
        if self.zero3:
            if mask is not None:
                zero3.check(None, mask_mode_needs_whole_weights=True)
            return zero3.step(self, fns)
        self.optimizer.zero_grad(set_to_none=True)
        if len(fns) == 1 and D.world() == 1:
            with self.accelerator.autocast():
                loss, logs = fns[0]()
            self.accelerator.backward(loss)
        else:
            loss, logs = self._accumulate(fns)
        self.masters.grads_to_master()
        if self.replicated:
            D.average_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        resolved = self._resolved(mask) if mask is not None else None
        if self.cfg.grad_clip:
            grads = [p for g in self.optimizer.param_groups for p in g["params"]]
            gn = torch.nn.utils.clip_grad_norm_(grads, self.cfg.grad_clip)
            logs["grad_norm"] = float(gn)
        if not self.finite_step(loss, logs):
            return logs
        if resolved is not None and self.cfg.mask_mode == "gradient":  # after clipping, as the released script
            mask_gradients(resolved, self.mask_chunk)
        if resolved is not None and self.cfg.mask_mode == "update":
            masked_adamw_step(self.torch_optimizer, resolved, self.mask_chunk)
            self.torch_optimizer._opt_called = True  # what the scheduler checks for "optimizer.step() first"
        else:
            self.optimizer.step()
        self.masters.master_to_model()
        if self.sparse is not None:
            self.sparse.write_back()
        self.scheduler.step()
        self.global_step += 1
        logs["loss"] = float(loss.detach())
        logs["lr"] = self.scheduler.get_last_lr()[0]
        return logs

    def _accumulate(self, fns: list[StepFn]) -> tuple[torch.Tensor, dict[str, float]]:
        """Backward of each micro-batch's loss / #micro-batches; the mean loss and logs over micro-batches and
        ranks. A failure on any rank stops every rank here with the same error (``distributed.agree``)."""
        if not fns:
            raise ConfigError("a training step needs at least one micro-batch")

        def run() -> tuple[list[float], list[dict[str, float]]]:
            losses, logs = [], []
            for f in fns:
                with self.accelerator.autocast():
                    loss, lg = f()
                self.accelerator.backward(loss / len(fns) if len(fns) > 1 else loss)
                losses.append(float(loss.detach()))
                logs.append(lg)
            return losses, logs

        losses, logs = D.agree(run)
        mean = {k: sum(lg[k] for lg in logs) / len(logs) for k in logs[0]}
        mean[LOSS] = sum(losses) / len(losses)
        mean = D.mean_over_ranks(mean)
        return torch.tensor(mean.pop(LOSS), dtype=torch.float64), mean

    # ---- numerical guard and resumable state ------------------------------------------------------------
    last_finite: tuple[int, float] | None = None  # (step, loss) of the last step with a finite loss
    skipped: tuple[int, ...] = ()  # steps skipped for a non-finite loss or gradient norm (on_nonfinite: skip)

    def finite_step(self, loss: torch.Tensor, logs: dict[str, float]) -> bool:
        """Check the loss and gradient norm before the optimizer moves anything.

        Finite: True. Otherwise NonFiniteError naming the step and the last finite loss, or, with
        ``on_nonfinite: skip``, the step is dropped (no update; the schedule advances) and False is returned.
        """
        value = float(loss.detach())
        gn = logs.get("grad_norm")
        if gn is None:  # the optimizer's tensors hold the gradients (fp32 masters, sparse entries)
            grads = [p.grad.detach().float().norm() for g in self.optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            gn = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        if math.isfinite(value) and math.isfinite(gn):
            self.last_finite = (self.global_step, value)
            return True
        what = f"loss ({value})" if not math.isfinite(value) else f"gradient norm ({gn})"
        if self.cfg.on_nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped = (*self.skipped, self.global_step)
            self.scheduler.step()
            self.global_step += 1
            logs.update(loss=value, lr=self.scheduler.get_last_lr()[0], skipped=1.0)
            return False
        last = ("no finite loss before it" if self.last_finite is None
                else f"last finite loss {self.last_finite[1]:.6g} at step {self.last_finite[0]}")
        raise NonFiniteError(
            f"non-finite {what} at step {self.global_step}; {last}; nothing was saved "
            "(lower lr, or set on_nonfinite=skip to skip such steps)"
        )

    def _weights(self) -> dict[str, torch.Tensor]:
        """The live tensors a checkpoint holds, by key: trainable weights, their fp32 masters, sparse entries."""
        names = {p: n for n, p in self.model.named_parameters()}
        out: dict[str, torch.Tensor] = dict(self.trainable_parameters())
        out |= {f"{MASTER}{names[p]}": m for p, m in self.masters.master.items()}
        if self.sparse is not None:
            out |= {f"{SPARSE}{names[e.weight]}": e.master for e in self.sparse.entries}
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the engine: trainable weights (CPU copies) with their fp32 masters or
        sparse entries, optimizer, schedule, step."""
        return {
            "model": {k: t.detach().to("cpu", copy=True).contiguous() for k, t in self._weights().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_step": self.global_step,
            "skipped": list(self.skipped),
            "last_finite": list(self.last_finite) if self.last_finite else None,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        live = self._weights()
        if set(d["model"]) != set(live):
            extra = sorted(set(d["model"]) ^ set(live))
            raise ModelError(f"checkpoint trains other parameters than this run, e.g. {extra[0]!r}")
        with torch.no_grad():
            for k, t in live.items():
                t.copy_(d["model"][k].to(t.device, t.dtype))
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])
        self.global_step = int(d["global_step"])
        self.skipped = tuple(int(i) for i in d.get("skipped", ()))
        last = d.get("last_finite")
        self.last_finite = (int(last[0]), float(last[1])) if last else None
