"""Unlearning: start from the vanilla model, run one registered method through the one engine, export.

``run_unlearn`` reads the benchmark, loads the vanilla model, lets the method prepare (frozen reference,
its own data, saliency masks), runs the method's schedule of steps — each step draws a forget and/or a retain
batch and is one ``Engine.step`` with the method's loss (and update mask on masked steps) — and writes, into a
fresh output directory built atomically:

* the unlearned model (merged weights, or a PEFT adapter with ``merge: false``);
* ``mmunlearn_run.json``: the exact, fully resolved configuration, the forget entities, per-step losses,
  optional in-training evaluations and timings; ``unlearn_config.yaml``: the same configuration, reusable
  with ``--config``;
* the method's artefacts (SIU: ``siu_data.json``; MMUnlearner: ``masks.safetensors``, ``mask_stats.json``);
* ``manifest.json``: hashes of the inputs and outputs, versions and hardware (``mmunlearn.manifest``).

Everything the run reads is validated before the model is loaded (``mmunlearn.validate``). A checkpoint is
kept every ``save_every`` steps and on SIGTERM / Ctrl-C; ``resume=True`` continues an interrupted run from
it (``mmunlearn.checkpoint``). The base model directory is never written to (it is protected as an output
path and only ever read).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from mmunlearn import config as C
from mmunlearn import distributed as D
from mmunlearn import manifest as M
from mmunlearn import validate as V
from mmunlearn.checkpoint import Checkpointer
from mmunlearn.data.batches import BatchStream, ImageCache, to_items
from mmunlearn.data.schema import KINDS, Benchmark, Example
from mmunlearn.errors import ConfigError
from mmunlearn.eval import metrics
from mmunlearn.eval.scoring import rank_options
from mmunlearn.methods import METHODS, Batches, Context, Method
from mmunlearn.methods import reference as R
from mmunlearn.methods.base import Step
from mmunlearn.models.base import ModelAdapter
from mmunlearn.outputs import check_output_dir, rank_zero_dir, write_json
from mmunlearn.train import recipes, zero3
from mmunlearn.train.engine import GROUPS, Engine, LoraOptions, OptimConfig

CONFIG_FILE = "unlearn_config.yaml"
# used where neither the run's configuration nor the method's ``defaults`` set a field
FALLBACK: dict[str, Any] = {
    "batch_size": 8, "lr": 1e-4, "group_lr": {}, "trainable": GROUPS, "scheduler": "constant",
    "forget_kinds": ("vqa",), "retain_kinds": ("vqa", "qa"),
}
RESOLVABLE = ("steps", "epochs", "warmup_ratio", *FALLBACK)


@dataclass
class UnlearnConfig:
    """Options of an unlearning run. Fields left ``None`` take the method's tuned ``defaults``.

    method: a registered method name (``mmunlearn.methods.METHODS``).
    forget_set / entities: the forget set by name, or an explicit list of entity ids (which wins).
    steps / epochs: length of training; ``epochs`` counts passes over the forget batches (MMUnlearner: retain
        batches). Setting one of them drops the method's default for the other.
    forget_kinds / retain_kinds: which training examples of the forget / retain entities the method sees
        ("vqa", "qa"); entity visual unlearning forgets VQA only.
    eval_every: every N steps, log multiple-choice accuracy on forget/retain VQA/QA (0 = never).
    merge: export merged weights (default) or, with LoRA, a PEFT adapter directory.
    save_every: a resumable checkpoint every N steps (0 = only on SIGTERM / Ctrl-C).
    on_nonfinite: a NaN/inf loss or gradient norm ``stop``s the run (nothing is saved) or ``skip``s the step
        (counted in the run record as ``skipped_steps``).
    method_options: the method's own options (validated by its ``Options`` dataclass).
    recipe: ``auto`` (the tuned tiny-model settings below 100M parameters, the papers' settings for real
        checkpoints; ``train/recipes.py``), ``tiny`` or ``paper``: fills the fields left unset.
    full_parameter: True trains full parameters even where the recipe uses LoRA; False asks for LoRA.
    warmup_steps / warmup_ratio: linear warm-up length, in steps or as a fraction of the run.
    gradient_checkpointing: None = on above 1B parameters.
    gradient_accumulation: micro-batches per step on each process. ``batch_size`` is the examples per step over
        all processes: each forget / retain batch splits into processes × gradient_accumulation equal
        micro-batches whose losses are averaged (docs/distributed.md).
    fsdp: shard the model over the processes (FSDP2, ``train/fsdp.py``).
    paper_exact: reproduce the official code (docs/paper_exact.md): the method's ``paper_exact`` options are
        forced (a contradicting explicit option is an error) and its ``paper_exact_defaults`` fill unset
        training fields before its tuned defaults do.
    """

    method: str = "mmunlearner"
    forget_set: str | None = "forget10"
    entities: list[str] | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    group_lr: dict[str, float] | None = None
    trainable: tuple[str, ...] | None = None
    lora: LoraOptions | None = None
    scheduler: str | None = None
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    forget_kinds: tuple[str, ...] | None = None
    retain_kinds: tuple[str, ...] | None = None
    seed: int = 0
    eval_every: int = 0
    merge: bool = True
    save_every: int = 50
    on_nonfinite: str = "stop"
    method_options: dict[str, Any] = field(default_factory=dict)
    recipe: str = "auto"
    full_parameter: bool | None = None
    gradient_checkpointing: bool | None = None
    paper_exact: bool = False
    gradient_accumulation: int = 1
    fsdp: bool = False

    def __post_init__(self) -> None:
        cls = METHODS.get(self.method)
        effective_options(cls, self.method_options, self.paper_exact)  # fail early on a bad option
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("forget_kinds", "retain_kinds"):
            kinds = getattr(self, name)
            if kinds is not None and (not kinds or any(k not in KINDS for k in kinds)):
                raise ConfigError(f"{name} must name some of {KINDS}, got {kinds}")
        if self.forget_set is None and not self.entities:
            raise ConfigError("set forget_set (a forget set of the benchmark) or entities (a list of entity ids)")
        if self.eval_every < 0 or self.save_every < 0:
            raise ConfigError(f"eval_every and save_every must be >= 0, got {self.eval_every}, {self.save_every}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.recipe not in recipes.NAMES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose from {', '.join(recipes.NAMES)}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.full_parameter and self.lora is not None:
            raise ConfigError("full_parameter=true and lora options contradict each other; set one")
        if self.gradient_accumulation < 1:
            raise ConfigError(f"gradient_accumulation must be >= 1, got {self.gradient_accumulation}")

    def resolved(self, recipe: dict[str, Any] | None = None) -> UnlearnConfig:
        """A copy with every unset field filled from ``recipe`` (default: the method's tuned ``defaults``),
        then the global fallback. A recipe's ``method_options`` lie under the run's own (not in paper-exact
        mode, whose options are the official code's)."""
        cls = METHODS.get(self.method)
        d = cls.defaults if recipe is None else recipe
        if self.paper_exact:  # the official code's training settings win over the recipe's
            d = d | cls.paper_exact_defaults
        values: dict[str, Any] = {}
        explicit_length = self.steps is not None or self.epochs is not None
        for name in RESOLVABLE:
            if getattr(self, name) is not None:
                continue
            if name in ("steps", "epochs") and explicit_length:
                continue
            if name in d:
                values[name] = d[name]
            elif name in FALLBACK:
                values[name] = FALLBACK[name]
        if d.get("method_options") and not self.paper_exact:  # the run's own options win over the recipe's
            values["method_options"] = dict(d["method_options"]) | dict(self.method_options)
        if self.lora is None and self.full_parameter is not True and d.get("lora") is not None:
            values["lora"] = C.build(LoraOptions, d["lora"], "recipe lora")
        elif self.lora is None and self.full_parameter is False:
            values["lora"] = LoraOptions()
        out = replace(self, **values)
        if out.steps is None and out.epochs is None:
            raise ConfigError(f"method {self.method!r}: set steps or epochs")
        return out


def method_options(cls: type[Method], options: dict[str, Any]) -> Any:
    return C.build(cls.Options, options, f"method_options ({cls.name})")


def effective_options(cls: type[Method], options: dict[str, Any], paper_exact: bool = False) -> Any:
    """The method's options; in paper-exact mode with ``cls.paper_exact`` forced on top. An explicit option
    that contradicts a paper-exact one is a ConfigError (the run could not be both)."""
    if not paper_exact:
        return method_options(cls, options)
    given = method_options(cls, options)
    exact = method_options(cls, {**options, **cls.paper_exact})
    for key, value in cls.paper_exact.items():
        if key in options and getattr(given, key) != getattr(exact, key):
            raise ConfigError(
                f"method_options.{key}={options[key]!r} contradicts paper_exact=true ({cls.name}'s official code "
                f"uses {value!r}); drop one of them"
            )
    return exact


def build_method(cfg: UnlearnConfig) -> Method:
    cls = METHODS.get(cfg.method)
    return cls(effective_options(cls, cfg.method_options, cfg.paper_exact))


def forget_entities(bench: Benchmark, cfg: UnlearnConfig) -> list[str]:
    if cfg.entities:
        known = {e.entity for e in bench.examples}
        bad = [e for e in cfg.entities if e not in known]
        if bad:
            raise ConfigError(f"entities {bad} are not in the benchmark {bench.root}")
        return sorted(set(cfg.entities))
    return sorted(bench.forget_set(cfg.forget_set))


def training_data(bench: Benchmark, forget: list[str], cfg: UnlearnConfig) -> tuple[list[Example], list[Example]]:
    f = [e for e in bench.select("forget", forget, purpose="train") if e.kind in cfg.forget_kinds]
    r = [e for e in bench.select("retain", forget, purpose="train") if e.kind in cfg.retain_kinds]
    if not f:
        raise ConfigError(f"the forget entities have no training examples of kinds {cfg.forget_kinds}")
    return f, r


def unlearn(
    adapter: ModelAdapter, bench: Benchmark, cfg: UnlearnConfig, out_dir: Path, progress: bool = True,
    checkpoints: Checkpointer | None = None,
) -> dict:
    """Unlearn in place (``adapter.model`` becomes the trained model); artefacts go to ``out_dir``.

    With ``checkpoints``, training continues from its latest checkpoint (if any) and saves new ones.
    """
    which = recipes.choose(cfg.recipe, adapter)
    cfg = cfg.resolved(recipes.recipe(cfg.method, METHODS.get(cfg.method).defaults, which, adapter))
    method = build_method(cfg)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    forget = forget_entities(bench, cfg)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    images = ImageCache(bench)
    f_data, r_data = training_data(bench, forget, cfg)
    ctx = Context(adapter=adapter, bench=bench, forget_entities=forget, forget_data=f_data, retain_data=r_data,
                  images=images, batch_size=cfg.batch_size, seed=cfg.seed, out_dir=Path(out_dir),
                  lora=cfg.lora is not None, trainable=tuple(cfg.trainable or ()), progress=progress,
                  resume=checkpoints is not None and checkpoints.latest() is not None)
    if method.reference == "logits" and cfg.lora is None:
        if zero3.requested():
            raise ConfigError(f"method {cfg.method!r} full-parameter keeps a frozen reference copy, which DeepSpeed "
                              "ZeRO-3 would hold whole on every GPU; use its LoRA recipe (full_parameter=false)")
        ctx.reference = R.frozen_copy(adapter)
    method.prepare(ctx)
    if method.reference == "sequence_logprobs":
        ctx.reference = precomputed_reference(adapter, ctx.forget_data, ctx.images, cfg.batch_size)
    t_prep = time.time() - t0
    f_stream = BatchStream(adapter, ctx.forget_data, ctx.images, cfg.batch_size, seed=cfg.seed)
    ctx.n_forget_batches = len(f_stream)
    r_stream = None
    if method.uses_retain:
        if not ctx.retain_data:
            raise ConfigError(f"method {cfg.method!r} needs retain data but the retain set is empty")
        r_stream = BatchStream(adapter, ctx.retain_data, images, cfg.batch_size, seed=cfg.seed + 1)
        ctx.n_retain_batches = len(r_stream)
    plan = method.schedule(ctx, cfg.steps, cfg.epochs)
    if zero3.requested() and any(s.masked for s in plan):
        zero3.check(None, mask_mode_needs_whole_weights=True)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil((cfg.warmup_ratio or 0) * len(plan))
    engine = Engine(adapter, OptimConfig(
        lr=cfg.lr, group_lr=cfg.group_lr, weight_decay=cfg.weight_decay, scheduler=cfg.scheduler,
        warmup_steps=warmup, max_steps=len(plan), grad_clip=cfg.grad_clip, trainable=cfg.trainable,
        lora=cfg.lora, mask_mode=method.mask_mode(), gradient_checkpointing=cfg.gradient_checkpointing,
        on_nonfinite=cfg.on_nonfinite, gradient_accumulation=cfg.gradient_accumulation, fsdp=cfg.fsdp,
        micro_batch=max(1, cfg.batch_size // (D.world() * cfg.gradient_accumulation)),
    ), seed=cfg.seed, trainable_masks=method.trainable_masks(ctx))
    ctx.engine = engine
    if method.reference == "logits" and cfg.lora is not None:
        ctx.reference = R.adapters_disabled(adapter)
    streams = {"forget": f_stream, **({"retain": r_stream} if r_stream is not None else {})}
    history, evals, start = [], [], 0
    ck = checkpoints.load() if checkpoints is not None else None  # also restores the random generators
    if ck is not None:
        engine.load_state_dict(ck.engine)
        for name, stream in streams.items():
            stream.load_state_dict(ck.state["streams"][name])
        history, evals, start = ck.state["history"], ck.state["evals"], ck.step
    bar = tqdm(range(start, len(plan)), initial=start, total=len(plan), desc=f"unlearn ({cfg.method})",
               disable=not progress)
    with checkpoints.signals() if checkpoints is not None else nullcontext():
        for i in bar:
            step = plan[i]
            logs = _unlearn_step(ctx, method, engine, step, streams, images, cfg.gradient_accumulation)
            kind = "joint" if step.forget and step.retain else ("forget" if step.forget else "retain")
            history.append({"step": i, "kind": kind, **rounded(logs)})
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if cfg.eval_every and ((i + 1) % cfg.eval_every == 0 or i == len(plan) - 1):
                evals.append({"step": i + 1, **quick_eval(adapter, bench, forget, images)})
                adapter.model.train()
            if checkpoints is not None and checkpoints.due(i + 1, len(plan)):
                state = {"streams": {k: v.state_dict() for k, v in streams.items()}, "history": history,
                         "evals": evals}
                checkpoints.save(i + 1, engine.state_dict(), state)
                checkpoints.stop_if_requested(i + 1, len(plan))
    V.check_finite_weights(engine.trainable_parameters())
    adapter.model.eval()
    return {
        "mode": "paper_exact" if cfg.paper_exact else "default",
        "config": C.to_dict(cfg), "method_options": C.to_dict(method.opt), "forget_entities": forget,
        "recipe": which, "reference": ctx.reference.kind if ctx.reference is not None else None,
        "gradient_checkpointing": engine.gradient_checkpointing,
        "trainable_entries": engine.sparse.selected() if engine.sparse is not None else None,
        "steps": len(plan), "forget_examples": len(ctx.forget_data), "retain_examples": len(ctx.retain_data),
        "skipped_steps": list(engine.skipped), "resumed_at_step": start if ck is not None else None,
        "seconds": {"prepare": round(t_prep, 2), "total": round(time.time() - t0, 2)},
        "history": history, "evals": evals, "artefacts": dict(ctx.artefacts),
    }


def encoded_batches(adapter: ModelAdapter, examples: list[Example], images: ImageCache, batch_size: int,
                    shard: bool = False):
    """``(examples, encoded batch)`` over ``examples`` in order, ``batch_size`` at a time (with ``shard``: only
    this process's share of the batches, ``distributed.my_batches``)."""
    chunks = [examples[lo : lo + batch_size] for lo in range(0, len(examples), batch_size)]
    for chunk in D.my_batches(chunks) if shard else chunks:
        yield chunk, adapter.encode(to_items(chunk, images))


def precomputed_reference(adapter: ModelAdapter, examples: list[Example], images: ImageCache,
                          batch_size: int) -> R.Reference:
    """NPO's log π_ref per forget sequence; with several processes each computes its share of the batches
    and every process gets all of them."""
    ref = R.precomputed(adapter, encoded_batches(adapter, examples, images, batch_size, shard=True))
    if D.world() > 1:
        ref.logprobs = {k: v for part in D.gather_objects(ref.logprobs) for k, v in part.items()}
    return ref


def rounded(logs: dict[str, float]) -> dict[str, float | None]:
    """Logged numbers to 5 decimals; NaN/inf (a skipped step) as None, which JSON can hold."""
    return {k: round(v, 5) if math.isfinite(v) else None for k, v in logs.items()}


def _unlearn_step(ctx: Context, method: Method, engine: Engine, step: Step, streams: dict[str, BatchStream],
                  images: ImageCache, accumulation: int = 1) -> dict[str, float]:
    """One planned step: draw its forget and/or retain batch, then one engine step (masked if planned).

    The batches split into this process's micro-batches (``distributed.micro_slices``; the whole batches on one
    process without accumulation); micro-batch i pairs forget part i with retain part i.
    """
    forget = streams["forget"].next_examples() if step.forget else []
    retain = streams["retain"].next_examples() if step.retain else []
    f_parts = [forget[s] for s in D.micro_slices(len(forget), accumulation, "a forget batch")] if forget else []
    r_parts = [retain[s] for s in D.micro_slices(len(retain), accumulation, "a retain batch")] if retain else []
    n = max(len(f_parts), len(r_parts))
    mask = method.step_mask(ctx, step) if step.masked else None

    def micro(i: int):
        def fn():
            b = Batches()
            if f_parts:
                b.forget_examples = f_parts[i]
                b.forget = ctx.adapter.encode(to_items(b.forget_examples, ctx.images))
            if r_parts:
                b.retain_examples = r_parts[i]
                b.retain = ctx.adapter.encode(to_items(b.retain_examples, images))
            return method.loss(ctx, b)
        return fn

    return engine.step([micro(i) for i in range(n)], mask)


@torch.no_grad()
def quick_eval(adapter: ModelAdapter, bench: Benchmark, forget: list[str], images: ImageCache,
               limit: int = 64) -> dict[str, float]:
    """Multiple-choice accuracy (%) on forget and retain VQA/QA (at most ``limit`` questions each)."""
    adapter.model.eval()
    out = {}
    for split in ("forget", "retain"):
        for kind in KINDS:
            ex = bench.select(split, forget, purpose="eval", kind=kind, task="mc")[:limit]
            if ex:
                pred = rank_options(adapter, ex, images)
                out[f"{split}_{kind}_mc"] = round(metrics.mc_accuracy(pred, [e.answer_index for e in ex]), 2)
    return out


def run_unlearn(
    data: str, model: str, out: str, cfg: UnlearnConfig, overwrite: bool = False, progress: bool = True,
    family: str | None = None, resume: bool = False, dtype: str = "auto",
) -> dict:
    """Unlearn ``model`` (the vanilla model directory) on benchmark ``data``; write everything to ``out``.

    Inputs are validated before the model is loaded; ``resume`` continues an interrupted run into ``out``.
    """
    from mmunlearn import commands as cmd  # commands imports the training modules
    from mmunlearn.models import dtype_name

    t0 = time.time()
    resolved = cfg.resolved()
    bench = D.agree(lambda: validate_unlearn(data, model, out, resolved, family, overwrite))
    protect = tuple(p for p in (model, data) if Path(p).is_dir())
    inputs = M.inputs(data, model)
    fingerprint = {"command": "unlearn", "config": resume_relevant(C.to_dict(resolved)), "family": family,
                   "inputs": inputs, "dtype": dtype_name(dtype)}
    with rank_zero_dir(out, overwrite=overwrite, protect=protect, resume=resume) as tmp:
        checkpoints = Checkpointer(tmp, resolved.save_every, fingerprint) if D.world() == 1 else None
        if checkpoints is not None:
            checkpoints.check()  # a checkpoint of another run is refused before the model is loaded
        adapter = cmd.open_model(model, bench, family, dtype)
        log = unlearn(adapter, bench, cfg, tmp, progress=progress and D.is_main(), checkpoints=checkpoints)
        record = {"command": "unlearn", "method": cfg.method, "data": str(Path(data).resolve()), "base_model": model,
                  "dtype": dtype_name(next(adapter.model.parameters()).dtype),
                  **log, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if D.world() > 1:
            record["processes"] = D.world()
        cmd.export(adapter, tmp, merge=cfg.merge)
        if D.is_main():
            write_json(tmp / cmd.RUN_FILE, record)
            resolved_dict = json.loads(json.dumps(log["config"] | {"method_options": log["method_options"]}))
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(resolved_dict, sort_keys=False))
            M.write_manifest(tmp, "unlearn", resolved_dict, cfg.seed, inputs, t0)
    return record


def resume_relevant(config: dict) -> dict:
    """The options a resumed run must share with the interrupted one (how often it saves may change)."""
    return {k: v for k, v in config.items() if k != "save_every"}


def validate_unlearn(data: str, model: str, out: str, cfg: UnlearnConfig, family: str | None,
                     overwrite: bool) -> Benchmark:
    """Everything an unlearning run reads, checked before a model is loaded (``cfg`` resolved)."""
    bench, hashes = V.check_data(data)
    forget, where = V.forget_source(bench, cfg.forget_set, cfg.entities)
    V.check_forget(bench, forget, hashes, where)
    _, retain = training_data(bench, forget, cfg)
    if METHODS.get(cfg.method).uses_retain and not retain:
        raise ConfigError(f"method {cfg.method!r} needs retain data but the retain set has no examples of "
                          f"kinds {cfg.retain_kinds}")
    V.check_model(model, family)
    check_output_dir(out, overwrite, tuple(p for p in (model, data) if Path(p).is_dir()))
    check_split(cfg.batch_size, cfg.gradient_accumulation)
    return bench


def check_split(batch_size: int, accumulation: int) -> None:
    """A step's batch must split into processes × accumulation equal micro-batches."""
    parts = D.world() * accumulation
    if batch_size % parts:
        raise ConfigError(f"batch_size {batch_size} does not split into {parts} equal micro-batches ({D.world()} "
                          f"processes x gradient_accumulation {accumulation}); use a multiple of {parts}")
