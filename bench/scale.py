"""Unlearning at 7B shapes: step throughput, MFU and peak memory per method, saliency, evaluation throughput
against a one-sample loop and the decode roofline, and the three memory figures of the lean engine.

    python bench/scale.py                # LLaVA-1.5-7B and Qwen2-VL-7B shapes (a GPU with >= 80 GB)
    python bench/scale.py --tiny         # the same code at small shapes on a CPU (~1 minute)
    python bench/scale.py --accounting   # bytes per parameter per method and mode, and the 7B peaks they predict

Models are random-init with the exact architecture of the published checkpoints (CLIP ViT-L/14-336 +
Llama-2-7B, vocabulary 32064; Qwen2-VL-7B's ViT + Qwen2-7B, vocabulary 152064): random weights give valid
timings and memory. Batches are synthetic: one image per sequence (576 image tokens for LLaVA, 144 merged
tokens for Qwen2-VL), text up to ``--seq`` tokens, the last ``--answer`` of them labelled.

Definitions (printed in the output too):
* model FLOPs of a step = Σ over its batches of (2 + w)·F_lm + F_vit + r·(F_lm + F_vit), with
  F_lm = 2·N_lm·T + 4·L·d·T² per sequence (weights and attention; the LM head only at the answer positions,
  as the engine computes it), F_vit = 2·N_vit·P per image, w = 1 when the LM's weights are trained in full
  (0 under LoRA: no weight gradients for frozen weights), r = 1 when the method runs a reference forward;
* MFU = model FLOPs / step time / peak FLOP/s (H100/H200 bf16 dense: 989 TFLOP/s; on a CPU: the measured
  rate of a large fp32 matmul, stated as such);
* decode roofline: at most bandwidth / weight bytes decode steps per second (weights read once per step;
  H100 3.35 TB/s, H200 4.8 TB/s; on a CPU the measured copy bandwidth); the fraction is the measured decode
  steps per second of the batched path over that bound.
Writes ``scale.json`` and ``scale.md`` to ``--out``; ends with the three figures of the lean engine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import ensure_exact_cpu_accounting, peak_memory  # noqa: E402

from mmunlearn.methods import METHODS, Batches, Context  # noqa: E402
from mmunlearn.methods import answer_states as AS  # noqa: E402
from mmunlearn.methods import losses as L  # noqa: E402
from mmunlearn.methods import reference as R  # noqa: E402
from mmunlearn.methods import saliency as S  # noqa: E402
from mmunlearn.models import ADAPTERS  # noqa: E402
from mmunlearn.train.engine import Engine, LoraOptions, OptimConfig  # noqa: E402
from mmunlearn.train.masks import PackedMask, clone_and_restore_step, masked_adamw_step  # noqa: E402

IMAGE, START, END, VIDEO = 1, 2, 3, 4  # offsets from the top of the vocabulary for the special tokens
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


@dataclass
class Shape:
    name: str
    family: str
    vision: dict
    text: dict
    image_size: int = 336


SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", "llava",
                          {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "patch_size": 14, "projection_dim": 768},
                          {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064}),
    "qwen2-vl-7b": Shape("qwen2-vl-7b", "qwen2-vl",
                         {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                         {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                          "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064}),
}
TINY = {
    "llava-1.5-7b": Shape("llava-tiny", "llava",
                          {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "patch_size": 14, "projection_dim": 64},
                          {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 4096}, 112),
    "qwen2-vl-7b": Shape("qwen2-vl-tiny", "qwen2-vl",
                         {"depth": 2, "embed_dim": 64, "hidden_size": 128, "mlp_ratio": 2, "num_heads": 4,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                         {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096}, 112),
}


# ---- models and batches ----------------------------------------------------------------------------------


def build(shape: Shape, device: torch.device, dtype: torch.dtype):
    """A random-init model of ``shape`` directly on ``device`` in ``dtype``, behind its family's adapter."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    v = shape.text["vocab_size"]
    if shape.family == "llava":
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(**shape.vision, image_size=shape.image_size),
            text_config=LlamaConfig(**shape.text, max_position_embeddings=4096, tie_word_embeddings=False),
            image_token_id=v - IMAGE, vision_feature_layer=-2, vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        cls = LlavaForConditionalGeneration
    else:
        half = shape.text["hidden_size"] // shape.text["num_attention_heads"] // 2  # 64 at 7B: [16, 24, 24]
        rope = {"rope_type": "default", "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8], "rope_theta": 1e6}
        text = dict(shape.text, max_position_embeddings=32768, rope_parameters=rope)
        cfg = Qwen2VLConfig(text_config=text, vision_config=shape.vision, image_token_id=v - IMAGE,
                            vision_start_token_id=v - START, vision_end_token_id=v - END,
                            video_token_id=v - VIDEO)
        cls = Qwen2VLForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0, eos_token="</s>"))
    return ADAPTERS.get(shape.family)(model, processor)


def image_tokens(shape: Shape) -> int:
    g = shape.image_size // shape.vision["patch_size"]
    return g * g if shape.family == "llava" else g * g // shape.vision["spatial_merge_size"] ** 2


def batch(shape: Shape, b: int, t: int, answer: int, device: torch.device, seed: int = 0) -> dict:
    """``b`` sequences of ``t`` tokens, one image each, the last ``answer`` tokens labelled."""
    g = torch.Generator().manual_seed(seed)
    v, n_img = shape.text["vocab_size"], image_tokens(shape)
    text = torch.randint(10, v - 10, (b, t), generator=g)
    img = [v - IMAGE] * n_img if shape.family == "llava" else [v - START, *[v - IMAGE] * n_img, v - END]
    text[:, 4 : 4 + len(img)] = torch.tensor(img)
    labels = torch.full_like(text, -100)
    labels[:, -answer:] = text[:, -answer:]
    out = {"input_ids": text, "attention_mask": torch.ones_like(text), "labels": labels}
    s, p = shape.image_size, shape.vision["patch_size"]
    if shape.family == "llava":
        out["pixel_values"] = torch.randn(b, 3, s, s, generator=g)
    else:
        grid = s // p
        out["pixel_values"] = torch.randn(b * grid * grid, 3 * 2 * p * p, generator=g)
        out["image_grid_thw"] = torch.tensor([[1, grid, grid]] * b)
        out["mm_token_type_ids"] = (text == v - IMAGE).long()  # 1 = image token, as the processor marks them
    return {k: x.to(device) for k, x in out.items()}


def counts(adapter) -> tuple[int, int]:
    groups = adapter.parameter_groups()
    params = dict(adapter.model.named_parameters())
    size = lambda names: sum(params[n].numel() for n in names)  # noqa: E731
    lm = size([n for n in groups["language"] if "embed_tokens" not in n and "lm_head" not in n])
    return lm, size(groups["vision"]) + size(groups["projector"])


def step_flops(shape: Shape, sizes: tuple[int, int], b: int, t: int, answer: int, batches: int, full: bool,
               ref: bool) -> float:
    lm, vit = sizes
    d, layers = shape.text["hidden_size"], shape.text["num_hidden_layers"]
    patches = (shape.image_size // shape.vision["patch_size"]) ** 2
    f_lm = 2 * lm * t + 4 * layers * d * t * t + 2 * d * shape.text["vocab_size"] * answer
    f_vit = 2 * vit * patches
    per_seq = (2 + int(full)) * f_lm + f_vit + int(ref) * (f_lm + f_vit)
    return per_seq * b * batches


# ---- measurements ----------------------------------------------------------------------------------------


@dataclass
class Hardware:
    device: torch.device
    name: str
    peak_flops: float
    bandwidth: float
    notes: list[str] = field(default_factory=list)


def hardware(device: torch.device) -> Hardware:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((k for k in PEAK_FLOPS if k in name), None)
        if key is None:
            return Hardware(device, name, math.nan, math.nan, [f"{name}: no peak figures known; MFU not given"])
        return Hardware(device, name, PEAK_FLOPS[key], BANDWIDTH[key],
                        [f"peak {PEAK_FLOPS[key] / 1e12:.0f} TFLOP/s bf16 dense, {BANDWIDTH[key] / 1e12} TB/s"])
    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    flops = 10 * 2 * 1024**3 / (time.perf_counter() - t0)
    x = torch.empty(64 * 2**20 // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    bw = 10 * 2 * x.numel() * 4 / (time.perf_counter() - t0)
    return Hardware(device, "cpu", flops, bw, [f"CPU: peak = measured fp32 matmul {flops / 1e9:.1f} GFLOP/s, "
                                                f"bandwidth = measured copy {bw / 1e9:.1f} GB/s"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_context(adapter, b: int, tmp: Path, lora: bool) -> Context:
    return Context(adapter=adapter, bench=None, forget_entities=[], forget_data=[], retain_data=[], images=None,
                   batch_size=b, seed=0, out_dir=tmp, lora=lora)


def unlearning_step(shape: Shape, method: str, mode: str, args, hw: Hardware) -> dict:
    """Median step time, tokens/s, MFU and peak memory of ``method`` (``steps`` steps after a warm-up) in
    ``mode``: full (dense AdamW on the LM), lora, or sparse (MMUnlearner: state for the masked entries only)."""
    try:
        return _unlearning_step(shape, method, mode, args, hw)
    except torch.OutOfMemoryError:
        return {"method": method, "mode": mode, "error": "out of memory"}
    finally:
        if hw.device.type == "cuda":
            torch.cuda.empty_cache()


def _unlearning_step(shape: Shape, method: str, mode: str, args, hw: Hardware) -> dict:
    dev, dtype, lora = hw.device, args.dtype, mode == "lora"
    adapter = build(shape, dev, dtype)
    b, t, ans = args.batch, args.seq, args.answer
    forget, retain = batch(shape, b, t, ans, dev, 1), batch(shape, b, t, ans, dev, 2)
    examples = [SimpleNamespace(id=f"f{i}") for i in range(b)]
    sizes = counts(adapter)
    cls = METHODS.get(method)
    m = cls()
    ctx = method_context(adapter, b, Path(tempfile.mkdtemp()), lora)
    if cls.reference == "logits" and not lora:
        ctx.reference = R.frozen_copy(adapter)
    if cls.reference == "sequence_logprobs":
        ctx.reference = R.precomputed(adapter, iter([(examples, forget)]))
    trainable = ("language",) if method != "siu" else ("projector", "language")
    lora_opt = LoraOptions(r=128 if method == "siu" else 8, alpha=256 if method == "siu" else 16, dropout=0.0,
                           groups=("language",), target_modules=list(adapter.lm_lora_targets)) if lora else None
    mask = None
    if method == "mmunlearner":  # half of every LM linear weight's entries, as a saliency mask at γ = 1 roughly
        g = torch.Generator(device=dev).manual_seed(0)
        mask = {n: PackedMask.pack(torch.rand(p.shape, generator=g, device=dev) < args.mask_density)
                for n, p in adapter.model.named_parameters() if adapter.group_of(n) == "language"
                and S.maskable(n, p)}
    engine = Engine(adapter, OptimConfig(lr=1e-5, max_steps=1000, trainable=trainable, lora=lora_opt,
                                         scheduler="constant", gradient_checkpointing=args.checkpointing),
                    trainable_masks=mask if mode == "sparse" else None)
    ctx.engine = engine
    if cls.reference == "logits" and lora:
        ctx.reference = R.adapters_disabled(adapter)
    if mode == "sparse":
        mask = None  # every step is confined to the masked entries already
    if method == "siu":
        m.spans, m.vocab_drop = {}, list(range(100, 110))
    plan = [("forget", True), ("retain", False)] if method == "mmunlearner" else [("joint", False)]

    def run_once() -> None:
        for kind, masked in plan:
            bs = Batches(forget=forget if kind != "retain" else None, forget_examples=examples,
                         retain=retain if kind == "retain" or cls.uses_retain else None)
            if kind == "forget":
                bs.retain = None
            engine.step(lambda bs=bs: m.loss(ctx, bs), mask if masked else None)

    run_once()
    times = []
    with peak_memory(dev) as peak:
        for _ in range(args.steps):
            sync(dev)
            t0 = time.perf_counter()
            run_once()
            sync(dev)
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    n_batches = 2 if (cls.uses_retain or method == "mmunlearner") else 1
    flops = step_flops(shape, sizes, b, t, ans, n_batches, full=not lora,
                       ref=cls.reference == "logits")
    out = {"method": method, "mode": mode, "step_s": round(dt, 4),
           "tokens_per_s": round(n_batches * b * t / dt, 1), "mfu": round(flops / dt / hw.peak_flops, 4),
           "peak_bytes": peak.peak, "reference": ctx.reference.kind if ctx.reference else None,
           "reference_extra_bytes": ctx.reference.extra_bytes(adapter.model) if ctx.reference else 0}

    return out


def saliency(shape: Shape, args, hw: Hardware) -> dict:
    adapter = build(shape, hw.device, args.dtype)
    names = [n for n, p in adapter.model.named_parameters() if adapter.group_of(n) == "language" and S.maskable(n, p)]
    batches = [batch(shape, args.batch, args.seq, args.answer, hw.device, i) for i in range(2)]
    with peak_memory(hw.device) as peak:
        t0 = time.perf_counter()
        scores, _ = S.importance(adapter, iter(batches), names)
        sync(hw.device)
        dt = time.perf_counter() - t0
    return {"batches": len(batches), "seconds": round(dt, 3), "peak_bytes": peak.peak,
            "scored_entries": sum(s.numel() for s in scores.values())}


@torch.no_grad()
def evaluation(shape: Shape, args, hw: Hardware) -> dict:
    """Batched greedy generation against one ``generate`` per prompt, and the batched path's decode steps/s
    against the roofline."""
    adapter = build(shape, hw.device, args.dtype)
    model = adapter.model.eval()
    n, t, new = args.eval_prompts, args.eval_prompt_len, args.new_tokens
    enc = batch(shape, n, t, 1, hw.device, 7)
    enc.pop("labels")
    gen = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}

    def timed(fn) -> float:
        sync(hw.device)
        t0 = time.perf_counter()
        fn()
        sync(hw.device)
        return time.perf_counter() - t0

    def one(i: int) -> dict:
        out = {k: v[i : i + 1] for k, v in enc.items() if k not in ("pixel_values", "image_grid_thw")}
        if shape.family == "llava":
            out["pixel_values"] = enc["pixel_values"][i : i + 1]
        else:
            per = enc["pixel_values"].shape[0] // n
            out["pixel_values"] = enc["pixel_values"][i * per : (i + 1) * per]
            out["image_grid_thw"] = enc["image_grid_thw"][i : i + 1]
        return out

    model.generate(**one(0), max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
    loop = timed(lambda: [model.generate(**one(i), max_new_tokens=new, min_new_tokens=new, **gen)
                          for i in range(n)])
    batched = timed(lambda: model.generate(**enc, max_new_tokens=new, min_new_tokens=new, **gen))
    prefill = timed(lambda: model.generate(**enc, max_new_tokens=1, min_new_tokens=1, **gen))
    steps_per_s = (new - 1) / max(1e-9, batched - prefill)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    bound = hw.bandwidth / weight_bytes
    return {"prompts": n, "prompt_tokens": t, "new_tokens": new, "loop_s": round(loop, 3),
            "batched_s": round(batched, 3), "speedup": round(loop / batched, 2),
            "decode_steps_per_s": round(steps_per_s, 2), "roofline_steps_per_s": round(bound, 2),
            "roofline_fraction": round(steps_per_s / bound, 3), "decode_weight_bytes": weight_bytes}


# ---- the three figures of the lean engine ---------------------------------------------------------------


def masked_update_memory(hw: Hardware, args) -> dict:
    """Extra memory of one masked optimizer step (over the step's starting memory) as a share of the trainable
    parameter bytes: the in-place masked AdamW against the former clone-and-restore. The LM is the shape's
    with 4 layers (fp32, every LM weight trained; half of each linear weight's entries masked): a share, so
    the depth hardly matters, and it fits any GPU."""
    out = {}
    shape = TINY["llava-1.5-7b"] if args.tiny else SHAPES["llava-1.5-7b"]
    shape = Shape(shape.name, shape.family, shape.vision, dict(shape.text, num_hidden_layers=4), shape.image_size)
    for kind in ("in_place", "clone_and_restore"):
        adapter = build(shape, hw.device, torch.float32)
        engine = Engine(adapter, OptimConfig(lr=1e-5, max_steps=10, trainable=("language",), scheduler="constant"))
        params = engine.trainable_parameters()
        g = torch.Generator(device=hw.device).manual_seed(0)
        masks = {n: torch.rand(p.shape, generator=g, device=hw.device) < 0.5 for n, p in params.items()
                 if S.maskable(n, p)}
        for p in params.values():  # a gradient and AdamW state for every entry, as after a retain step
            p.grad = torch.randn_like(p)
        engine.torch_optimizer.step()
        for p in params.values():
            p.grad = torch.randn_like(p)
        resolved = engine.resolve_mask(masks)
        with peak_memory(hw.device) as peak:
            if kind == "in_place":
                masked_adamw_step(engine.torch_optimizer, resolved, engine.mask_chunk)
            else:
                clone_and_restore_step(engine.torch_optimizer, params, masks)
        trainable = sum(p.numel() * p.element_size() for p in params.values())
        out[kind] = {"extra_bytes": peak.extra, "trainable_bytes": trainable,
                     "percent": round(100 * peak.extra / trainable, 2),
                     "mask_bytes": sum(m.bits.numel() for m in resolved.values())}
        del engine, adapter, params, masks, resolved
    return out


def reference_memory(hw: Hardware, args) -> dict:
    shape = TINY["llava-1.5-7b"] if args.tiny else SHAPES["llava-1.5-7b"]
    adapter = build(shape, hw.device, args.dtype)
    copied = R.frozen_copy(adapter)
    copy_bytes = copied.extra_bytes(adapter.model)
    del copied
    Engine(adapter, OptimConfig(max_steps=1, trainable=("language",), lora=LoraOptions(r=8, groups=("language",))))
    ref = R.adapters_disabled(adapter)
    enc = batch(shape, 2, 128 if args.tiny else 1024, 16, hw.device)
    ref.states(enc)
    return {"lora_extra_bytes": ref.extra_bytes(adapter.model), "frozen_copy_extra_bytes": copy_bytes}


def loss_memory(hw: Hardware, args) -> dict:
    """Peak memory of forward + backward of each vocabulary-sized loss, chunked at answer positions against
    the (B, T, V) full-logit version, at Qwen2-VL's vocabulary."""
    v, h = 152064, 256 if args.tiny else 3584
    b, t, ans = (2, 384, 48) if args.tiny else (4, 2048, 256)
    dev = hw.device
    g = torch.Generator(device=dev).manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False, device=dev)
    ref_head = copy.deepcopy(head).requires_grad_(False)
    labels = torch.full((b, t), -100, device=dev)
    labels[:, -ans:] = torch.randint(0, v, (b, ans), generator=g, device=dev)
    keep = torch.ones(b, t - 1, dtype=torch.bool, device=dev)
    losses = {
        "ce": (lambda lg, rl: L.answer_ce(lg, labels), lambda s, r: AS.ce(s)),
        "kl": (lambda lg, rl: L.kl_to_reference(rl, lg, labels), lambda s, r: AS.kl(r, s)),
        "dmk": (lambda lg, rl: L.dmk_loss(rl, lg, labels, keep, [5, 6]), lambda s, r: AS.kl(r, s, keep, [5, 6])),
        "npo_logprob": (lambda lg, rl: L.sequence_logprob(lg, labels).sum(),
                        lambda s, r: AS.sequence_logprob(s).sum()),
    }
    out = {}
    for name, (full_fn, chunked_fn) in losses.items():
        row = {}
        for kind in ("full", "chunked"):
            hidden = torch.randn(b, t, h, generator=g, device=dev, requires_grad=True)
            ref_hidden = torch.randn(b, t, h, generator=g, device=dev)
            with peak_memory(dev) as peak:
                if kind == "full":
                    with torch.no_grad():
                        rl = ref_head(ref_hidden)
                    loss = full_fn(head(hidden), rl)
                    del rl
                else:
                    loss = chunked_fn(AS.select(hidden, labels, head), AS.select(ref_hidden, labels, ref_head))
                loss.backward()
                del loss
            row[kind] = peak.extra
            head.zero_grad(set_to_none=True)
            del hidden, ref_hidden
        row["ratio"] = round(row["chunked"] / max(1, row["full"]), 4)
        out[name] = row
    return {"vocab": v, "batch": b, "seq": t, "answer_tokens": ans, "hidden": h, "losses": out,
            "worst_ratio": max(r["ratio"] for r in out.values())}


# ---- memory accounting -----------------------------------------------------------------------------------


def accounting(density: float = 0.5) -> str:
    """Bytes of model and training state (activations excluded) per method and mode at the 7B shapes, from
    the parameter counts of the real architectures (built on the meta device: no memory, no time).

    Per parameter: bf16 weights 2 B everywhere; dense full-parameter training of the LM adds a bf16 gradient
    (2), an fp32 master (4) and its gradient (4) and AdamW's two fp32 moments (8) per LM parameter; a frozen
    reference copy adds the bf16 weights again; LoRA and the adapters-disabled reference add nothing of size;
    MMUnlearner's sparse state adds 16 B per selected entry (master, its gradient, two moments) and 1 bit per
    masked-weight entry, plus one dense bf16 gradient of the largest masked weight in flight; saliency holds a
    bf16 gradient and one fp32 accumulator per scored entry (finished sets go to host memory).
    """
    rows = ["| state (activations excluded) | " + " | ".join(SHAPES) + " |", "|---|" + "---:|" * len(SHAPES)]
    cells: dict[str, list[str]] = {}
    for shape in SHAPES.values():
        adapter = build(shape, torch.device("meta"), torch.bfloat16)
        params = dict(adapter.model.named_parameters())
        total = sum(p.numel() for p in params.values())
        lm = [n for n in params if adapter.group_of(n) == "language"]
        linear = [n for n in lm if S.maskable(n, params[n])]
        n_lm, n_lin = sum(params[n].numel() for n in lm), sum(params[n].numel() for n in linear)
        largest = max(params[n].numel() for n in linear)
        gb = lambda b: f"{b / 1e9:.0f} GB"  # noqa: E731
        figures = {
            "parameters (total / LM / LM linear weights)": f"{total / 1e9:.2f}B / {n_lm / 1e9:.2f}B / "
                                                             f"{n_lin / 1e9:.2f}B",
            "inference, or LoRA training with the adapters-disabled reference (bf16)": gb(2 * total),
            "full LM, dense AdamW with fp32 masters (GA_Diff, NPO with precomputed reference)":
                gb(2 * total + 18 * n_lm),
            "full LM, dense, + frozen bf16 reference copy (KL_Min, GA+KL, SIU full)": gb(4 * total + 18 * n_lm),
            f"MMUnlearner sparse, mask density {density}": gb(2 * total + 16 * density * n_lin + n_lin / 8
                                                              + 2 * largest),
            "MMUnlearner dense (the update mask inside AdamW)": gb(2 * total + 18 * n_lm + n_lin / 8),
            "saliency scores (one set on the GPU)": gb(2 * total + 6 * n_lin),
        }
        for k, v in figures.items():
            cells.setdefault(k, []).append(v)
    rows += [f"| {k} | " + " | ".join(v) + " |" for k, v in cells.items()]
    return "\n".join(rows)


# ---- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes on a CPU")
    ap.add_argument("--accounting", action="store_true", help="print the memory accounting table and exit")
    ap.add_argument("--out", default="runs/bench-scale")
    ap.add_argument("--methods", default="ga_diff,kl_min,npo,siu,mmunlearner")
    ap.add_argument("--shapes", default="llava-1.5-7b,qwen2-vl-7b")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    if args.accounting:
        print(accounting())
        return
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if dev.type == "cpu":
        ensure_exact_cpu_accounting()
        torch.set_num_threads(1)  # small shapes gain nothing from threads, and spinning threads collapse when
        # another process shares the cores
    torch.manual_seed(0)
    hw = hardware(dev)
    tiny = args.tiny
    args.dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args.batch, args.seq, args.answer = (2, 128, 16) if tiny else (8, 1024, 128)
    args.steps = args.steps or (2 if tiny else 5)
    args.checkpointing = None if tiny else True
    args.mask_density = 0.5
    args.eval_prompts, args.eval_prompt_len, args.new_tokens = (6, 96, 8) if tiny else (64, 640, 16)
    table = TINY if tiny else SHAPES
    result: dict = {"hardware": hw.name, "notes": hw.notes, "tiny": tiny, "dtype": str(args.dtype),
                    "batch": args.batch, "seq": args.seq, "answer": args.answer, "shapes": {}}
    for key in args.shapes.split(","):
        shape = table[key]
        rows = []
        for method in args.methods.split(","):
            modes = {"mmunlearner": ["full", "sparse"], "siu": ["lora"]}.get(method, ["full", "lora"])
            for mode in modes:
                rows.append(unlearning_step(shape, method, mode, args, hw))
                print(json.dumps({"shape": shape.name, **rows[-1]}), flush=True)
        result["shapes"][shape.name] = {"steps": rows, "saliency": saliency(shape, args, hw),
                                        "evaluation": evaluation(shape, args, hw)}
        print(json.dumps({"shape": shape.name, "saliency": result["shapes"][shape.name]["saliency"],
                          "evaluation": result["shapes"][shape.name]["evaluation"]}), flush=True)
    result["masked_update"] = masked_update_memory(hw, args)
    result["reference"] = reference_memory(hw, args)
    result["loss_memory"] = loss_memory(hw, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    (out / "scale.md").write_text(markdown(result))
    print(markdown(result))
    mu, ref, lm = result["masked_update"]["in_place"], result["reference"], result["loss_memory"]
    print(f"masked-update extra memory: {mu['percent']}% of trainable parameter bytes")
    print(f"reference extra memory with LoRA: {ref['lora_extra_bytes'] / 1e6:.3f} MB")
    print(f"loss peak memory, chunked/full: {lm['worst_ratio']}")


def markdown(r: dict) -> str:
    gb = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    lines = [f"# Scale benchmark ({'tiny shapes, ' if r['tiny'] else ''}{r['hardware']}, {r['dtype']})", "",
             *[f"- {n}" for n in r["notes"]], f"- batch {r['batch']} × {r['seq']} tokens, {r['answer']} answer "
             "tokens per sequence", ""]
    for name, s in r["shapes"].items():
        lines += [f"## {name}", "", "| method | mode | reference | step (s) | tokens/s | MFU | peak memory |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {x['method']} | {x['mode']} | – | – | – | – | {x['error']} |" if "error" in x else
                  f"| {x['method']} | {x['mode']} | {x['reference'] or '–'} | {x['step_s']} | {x['tokens_per_s']} | "
                  f"{100 * x['mfu']:.1f} % | {gb(x['peak_bytes'])} |" for x in s["steps"]]
        sal, ev = s["saliency"], s["evaluation"]
        lines += ["", f"Saliency (LM linear weights, {sal['batches']} batches): {sal['seconds']} s, peak "
                  f"{gb(sal['peak_bytes'])}.", "",
                  f"Evaluation ({ev['prompts']} prompts × {ev['prompt_tokens']} tokens, {ev['new_tokens']} new): "
                  f"loop {ev['loop_s']} s, batched {ev['batched_s']} s = {ev['speedup']}x; decode "
                  f"{ev['decode_steps_per_s']} steps/s = {100 * ev['roofline_fraction']:.1f} % of the roofline "
                  f"({ev['roofline_steps_per_s']} steps/s).", ""]
    mu = r["masked_update"]
    lines += ["## Lean engine", "", "| figure | value |", "|---|---|",
              f"| masked update, in place: extra memory | {mu['in_place']['percent']} % of trainable bytes |",
              f"| masked update, clone-and-restore (before) | {mu['clone_and_restore']['percent']} % |",
              f"| mask storage | {mu['in_place']['mask_bytes']} B (1 bit per entry) |",
              f"| reference with LoRA (adapters disabled) | {r['reference']['lora_extra_bytes']} B extra |",
              f"| reference as a frozen copy | {gb(r['reference']['frozen_copy_extra_bytes'])} extra |"]
    lm = r["loss_memory"]
    lines += [f"| loss peak, chunked/full ({k}, V={lm['vocab']}) | {v['ratio']} |" for k, v in lm["losses"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
