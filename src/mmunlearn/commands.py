"""What each CLI command does, as plain functions (the CLI only parses arguments and prints)."""

from __future__ import annotations

import time
from pathlib import Path

from mmunlearn import config as C
from mmunlearn import distributed as D
from mmunlearn import manifest as M
from mmunlearn import validate as V
from mmunlearn.checkpoint import Checkpointer
from mmunlearn.data.fictitious import FictitiousConfig, make_fictitious
from mmunlearn.data.schema import Benchmark
from mmunlearn.errors import ConfigError, DataError, ModelError
from mmunlearn.eval.cache import EvalCache, default_cache_dir, fingerprint
from mmunlearn.eval.runner import EvalConfig, evaluate, mode_of
from mmunlearn.models import FAMILIES, ModelAdapter, dtype_name, load_adapter, resolve_dtype
from mmunlearn.models.llava import LlavaAdapter
from mmunlearn.models.tiny import TinyConfig, build_tiny
from mmunlearn.outputs import check_output_dir, rank_zero_dir, write_json
from mmunlearn.train import zero3
from mmunlearn.train.finetune import FinetuneConfig, finetune, training_examples
from mmunlearn.train.fsdp import full_state, is_sharded

RUN_FILE = "mmunlearn_run.json"


def benchmark_corpus(bench: Benchmark) -> list[str]:
    """Every text the benchmark can ask or answer, for the tiny model's tokenizer."""
    texts = [f"{e.prompt} {e.answer}" for e in bench.examples]
    texts += [" ".join(e.options) for e in bench.examples if e.options]
    texts += list(bench.info.get("unseen_names", []))
    return texts + ["USER: ASSISTANT:"] * 50


def open_model(model: str, bench: Benchmark | None = None, family: str | None = None,
               dtype: str = "auto") -> ModelAdapter:
    """``tiny`` builds the embedded model for ``bench``; ``smol`` is the real small VLM assembled from installed
    wheels (cached after the first build, models/smol.py); anything else is a model directory (or hub id).
    ``dtype``: auto | bfloat16 | float16 | float32 (auto: bfloat16 on CUDA, float32 on the CPU)."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)}")
    if model == "tiny" or family == "tiny" and not Path(model).is_dir():
        if bench is None:
            raise ConfigError("the tiny model is built from a benchmark: pass --data")
        m, p = build_tiny(benchmark_corpus(bench), TinyConfig())
        return LlavaAdapter(m.to(D.device(), resolve_dtype(dtype)), p)
    if model == "smol" and not Path(model).exists():
        from mmunlearn.models.smol import build_smol_base

        return load_adapter(build_smol_base(), family="smol", dtype=dtype, device=str(D.device()))
    if not Path(model).exists() and family is None:
        raise ModelError(f"model directory does not exist: {model}")
    return load_adapter(model, family=family, dtype=dtype, device=str(D.device()))


def make_data(out: str, cfg: FictitiousConfig, overwrite: bool = False) -> Benchmark:
    return make_fictitious(out, cfg, overwrite=overwrite)


def run_finetune(data: str, model: str, out: str, cfg: FinetuneConfig, family: str | None = None,
                 overwrite: bool = False, progress: bool = True, resume: bool = False, dtype: str = "auto") -> dict:
    """Fine-tune ``model`` on benchmark ``data`` into ``out`` (validated first; ``resume`` continues into it)."""
    t0 = time.time()
    protect = tuple(p for p in (model, data) if Path(p).is_dir())
    bench = D.agree(lambda: _validate_finetune(data, model, out, cfg, family, overwrite, protect))
    inputs = M.inputs(data, model)
    config = {k: v for k, v in C.to_dict(cfg).items() if k != "save_every"}  # saving more often may change
    # the weights' dtype too: a float32 run does not continue a bfloat16 one's checkpoint
    fingerprint = {"command": "finetune", "config": config, "family": family, "inputs": inputs,
                   "dtype": dtype_name(dtype)}
    with rank_zero_dir(out, overwrite=overwrite, protect=protect, resume=resume) as tmp:
        checkpoints = Checkpointer(tmp, cfg.save_every, fingerprint) if D.world() == 1 else None
        if checkpoints is not None:
            checkpoints.check()
        adapter = open_model(model, bench, family, dtype)
        log = finetune(adapter, bench, cfg, progress=progress and D.is_main(), checkpoints=checkpoints)
        V.check_finite_weights(dict(adapter.model.named_parameters()))
        export(adapter, tmp, merge=True)
        record = {"command": "finetune", "data": str(Path(data).resolve()), "base_model": model,
                  "dtype": dtype_name(next(adapter.model.parameters()).dtype),
                  "config": C.to_dict(cfg), "log": log, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if D.world() > 1:
            record["processes"] = D.world()
        if D.is_main():
            write_json(tmp / RUN_FILE, record)
            M.write_manifest(tmp, "finetune", C.to_dict(cfg), cfg.seed, inputs, t0)
    return record


def _validate_finetune(data: str, model: str, out: str, cfg: FinetuneConfig, family: str | None, overwrite: bool,
                       protect: tuple[str, ...]) -> Benchmark:
    bench, _ = V.check_data(data)
    if not training_examples(bench):
        raise DataError(f"{Path(data) / 'examples.jsonl'}: no examples with purpose 'train' to fine-tune on")
    V.check_model(model, family)
    check_output_dir(out, overwrite, protect)
    parts = D.world() * cfg.gradient_accumulation
    if cfg.batch_size % parts:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split into {parts} equal micro-batches "
                          f"({D.world()} processes x gradient_accumulation {cfg.gradient_accumulation}); "
                          f"use a multiple of {parts}")
    return bench


def export(adapter: ModelAdapter, out: Path, merge: bool = True) -> None:
    """Save an ordinary model directory; a LoRA model is merged, or saved as a PEFT adapter if merge=False.
    With several processes only rank 0 writes (a sharded model is gathered first, by every rank)."""
    from peft import PeftModel

    model = adapter.model
    if isinstance(model, PeftModel):
        if merge:
            adapter.model = model.merge_and_unload()
        else:
            if D.is_main():
                model.save_pretrained(out)
                adapter.processor.save_pretrained(out)
            return
    if zero3.requested():  # DeepSpeed ZeRO-3: every rank takes part in gathering the 16-bit weights
        full = zero3.full_state(adapter.model)
        if D.is_main():
            adapter.unwrapped().save_pretrained(out, state_dict=full, safe_serialization=True)
            adapter.processor.save_pretrained(out)
    elif is_sharded(adapter.model):  # FSDP2: every rank takes part in gathering the whole weights
        full = full_state(adapter.model, adapter.model.state_dict())
        if D.is_main():
            adapter.model.save_pretrained(out, state_dict=full, safe_serialization=True)
            adapter.processor.save_pretrained(out)
    elif D.is_main():
        adapter.save(out)


def run_evaluate(data: str, model: str, cfg: EvalConfig, out: str | None = None, progress: bool = True,
                 dtype: str = "auto") -> dict:
    """Score ``model`` on every split of ``data``; with ``out``, a results JSON, a Markdown table and a manifest."""
    t_start = time.time()
    bench = D.agree(lambda: _validate_evaluate(data, model, cfg, out))
    progress = progress and D.is_main()
    adapter = open_model(model, bench, dtype=dtype)
    reference = open_model(cfg.reference, bench, dtype=dtype) if cfg.reference else None
    cache = None
    if cfg.cache and Path(model).is_dir():
        cache = EvalCache(
            cfg.cache_dir or default_cache_dir(), fingerprint(model), fingerprint(Path(data) / "examples.jsonl"),
            fingerprint(cfg.reference) if cfg.reference else None, C.to_dict(cfg), dtype_name(dtype),
        )
    t0 = time.time()
    res = {"model": model, "data": str(Path(data).resolve()), "mode": mode_of(cfg), "config": C.to_dict(cfg),
           "results": evaluate(adapter, bench, cfg, progress=progress, cache=cache, reference=reference)}
    res["seconds"] = round(time.time() - t0, 1)
    res["cached_units"] = cache.hits if cache else 0
    D.agree(lambda: _write_evaluation(res, data, model, cfg, out, t_start) if out and D.is_main() else None)
    return res


def _validate_evaluate(data: str, model: str, cfg: EvalConfig, out: str | None) -> Benchmark:
    bench, _ = V.check_data(data)
    bench.forget_set(cfg.forget_set)  # fail early on an unknown forget set
    V.check_model(model, None)
    if cfg.reference:
        V.check_model(cfg.reference, None)
    if out and Path(out).is_dir():
        raise ConfigError(f"option --out: {out} is a directory; name the results JSON file to write")
    for p in (model, data, cfg.reference):
        if out and p and Path(p).is_dir() and Path(out).resolve().is_relative_to(Path(p).resolve()):
            raise ConfigError(f"option --out: {out} would write into {p}; choose another --out")
    return bench


def _write_evaluation(res: dict, data: str, model: str, cfg: EvalConfig, out: str, t_start: float) -> None:
    """The results JSON, its Markdown table and the manifest (rank 0 only)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, res)
        md = Path(out).with_suffix(".md")
        md.write_text(results_markdown({"model": res}))
        inputs = M.inputs(data, model)
        inputs["model"] = inputs.pop("base_model")
        if cfg.reference:
            inputs["reference_model"] = M.inputs(None, cfg.reference)["base_model"]
        M.write_manifest(out, "evaluate", C.to_dict(cfg), None, inputs, t_start, output_files=[Path(out), md])


def check_manifest(target: str) -> list[str]:
    """Mismatches between a run's manifest and the files now on disk (empty: all as recorded)."""
    return M.check(target)


COLUMNS = [
    ("forget", "vqa", "mc_acc"), ("forget", "qa", "mc_acc"), ("retain", "vqa", "mc_acc"), ("retain", "qa", "mc_acc"),
    ("test", "vqa", "mc_acc"), ("test", "qa", "mc_acc"), ("utility", "vqa", "mc_acc"), ("utility", "qa", "mc_acc"),
    ("forget", "vqa", "name_rate"), ("test", "vqa", "name_rate"), ("retain", "vqa", "name_rate"),
    ("forget", "qa", "gen_rougeL"), ("forget", "vqa", "cloze_acc"), ("forget", "qa", "cloze_acc"),
]


def results_markdown(rows: dict[str, dict]) -> str:
    """One row per model: its evaluation mode, MC accuracy (%) per split and kind, name rate on identity
    questions, ROUGE-L."""
    cols = [c for c in COLUMNS if any(c[2] in r["results"].get(c[0], {}).get(c[1], {}) for r in rows.values())]
    head = "| model | mode | " + " | ".join(f"{s} {k.upper()} {m}" for s, k, m in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, r in rows.items():
        cells = [str(r.get("mode", "default"))]
        for s, k, m in cols:
            v = r["results"].get(s, {}).get(k, {}).get(m)
            cells.append("–" if v is None else (f"{v:.3f}" if m == "gen_rougeL" else f"{v:.1f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"




def verify_forget_entities(bench: Benchmark, model: str, cfg) -> list[str]:
    """The entities a verification is about: given ones, a named forget set, or the model's unlearning record."""
    if cfg.entities:
        return sorted(set(cfg.entities))
    if cfg.forget_set:
        return sorted(bench.forget_set(cfg.forget_set))
    record = Path(model) / RUN_FILE
    if record.is_file():
        from mmunlearn.outputs import read_json_object

        ents = read_json_object(record, what="run record").get("forget_entities")
        if ents:
            return sorted(ents)
    raise ConfigError(f"{model}: no unlearning run record names its forget entities; pass "
                      "--set forget_set=NAME (or entities=[...])")


def run_verify(model: str, data: str, reference: str, oracle: str | None, cfg, out: str | None = None,
               measured: dict[str, dict] | None = None, dtype: str = "auto") -> dict:
    """Measure ``model``, the vanilla ``reference`` and the ``oracle`` (if any), compare, and write
    ``verification.json`` and ``verification.md`` into ``out`` (default: the model directory).

    ``measured`` maps model paths to measurements already taken (the demo measures vanilla and oracle once);
    new ones are added to it. ``dtype``: the weights' dtype of the models loaded here (as ``open_model``).
    """
    from mmunlearn.verify.measure import measure
    from mmunlearn.verify.verdict import compare, write

    bench = Benchmark.load(data)
    for what, path in (("model", model), ("reference", reference), ("oracle", oracle)):
        if path is not None and not Path(path).is_dir():
            raise ModelError(f"{what} model directory does not exist: {path}")
    forget = verify_forget_entities(bench, model, cfg)
    measured = {} if measured is None else measured
    t0 = time.time()
    for path in (model, reference, oracle):
        if path is not None and path not in measured:
            measured[path] = measure(open_model(path, bench, dtype=dtype), bench, forget, cfg)
    result = {"model": model, "reference": reference, "oracle": oracle, "data": str(Path(data).resolve()),
              "forget_entities": forget, "config": C.to_dict(cfg),
              **compare(measured[model], measured[reference], measured[oracle] if oracle else None, cfg.thresholds,
                        cfg.kind, cfg.min_gap),
              "measurements": {"model": measured[model], "reference": measured[reference],
                               "oracle": measured[oracle] if oracle else None},
              "seconds": round(time.time() - t0, 1)}
    result["files"] = {k: str(v) for k, v in write(result, out or model).items()}
    return result
