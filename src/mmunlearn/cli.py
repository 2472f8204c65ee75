"""The ``mmunlearn`` command line. Every problem the user can fix ends as one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from mmunlearn import config as C
from mmunlearn.errors import ConfigError, MMUError, RunInterrupted


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of options")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an option (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="weights' dtype (auto: bfloat16 on CUDA, float32 on the CPU)")


def _resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run into --out from its last checkpoint (same options)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmunlearn", description="Machine unlearning for multimodal LLMs.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-data", help="generate the built-in benchmark, or convert a real one")
    p.add_argument("--out", required=True, help="benchmark directory to write")
    p.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "PATH"),
                   help="convert a local copy: mllmu-bench | clear | mmubench, and its path")
    _common(p)

    p = sub.add_parser("finetune", help="vanilla fine-tuning: teach a model the benchmark")
    p.add_argument("--data", required=True, help="benchmark directory")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built-in), 'smol' (real small VLM, extra 'smol') or a model directory")
    p.add_argument("--family", help="model family (tiny, llava, qwen2-vl, smol); default: from config.json")
    p.add_argument("--out", required=True, help="output model directory")
    _dtype(p)
    _resume(p)
    _common(p)

    p = sub.add_parser("unlearn", help="unlearn a forget set (or entities) from a vanilla model")
    p.add_argument("--data", required=True, help="benchmark directory")
    p.add_argument("--model", required=True, help="the vanilla model directory (never modified)")
    p.add_argument("--method", help="ga, ga_kl, ga_diff, kl_min, npo, po, siu, mmunlearner")
    p.add_argument("--family", help="model family; default: from config.json")
    p.add_argument("--out", required=True, help="output model directory")
    _dtype(p)
    _resume(p)
    p.add_argument("--verify", action="store_true",
                   help="then verify the unlearned model against --model (and --oracle): verification.json/.md")
    p.add_argument("--oracle", help="with --verify: a model trained without the forget data (finetune "
                   "--set exclude_forget=...)")
    _common(p)

    p = sub.add_parser("verify", help="did it really forget? attacks, forget quality, MIA, probes and a verdict")
    p.add_argument("model", help="the unlearned model directory")
    p.add_argument("--data", required=True, help="benchmark directory")
    p.add_argument("--reference", required=True, help="the vanilla model it was unlearned from")
    p.add_argument("--oracle", help="a model trained without the forget data (finetune --set exclude_forget=...)")
    p.add_argument("--out", help="directory for verification.json and verification.md (default: the model's)")
    _dtype(p)
    _common(p)

    p = sub.add_parser("evaluate", help="score a model on every split")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", help="results JSON (a Markdown table is written beside it)")
    _dtype(p)
    _common(p)

    p = sub.add_parser("report", help="Markdown + HTML report with plots from results JSON files")
    p.add_argument("results", nargs="+", help="results.json of demo (or its directory) and/or evaluate --out files")
    p.add_argument("--out", required=True, help="directory for report.md, report.html and the plots")
    p.add_argument("--title", default="mmunlearn report")

    p = sub.add_parser("manifest", help="check a run's outputs and inputs against its manifest")
    p.add_argument("action", choices=["check"])
    p.add_argument("target", help="a finetune/unlearn output directory, or an evaluate results JSON")

    p = sub.add_parser("demo", help="the whole pipeline on the built-in benchmark (tiny model, or --model smol)")
    p.add_argument("--workdir", default="runs/demo", help="where data, models and the report go")
    p.add_argument("--fast", action="store_true", help="a reduced configuration (for smoke tests)")
    p.add_argument("--model", choices=("tiny", "smol"), default="tiny",
                   help="tiny (built in) or smol (the real small VLM on a reduced benchmark; extra 'smol')")
    _common(p)
    return ap


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    from mmunlearn import commands as cmd

    progress = not getattr(args, "quiet", False)
    if args.command == "make-data":
        if args.source:
            from mmunlearn.data.convert import convert

            fmt, path = args.source
            opts = C.merge(C.read_yaml(args.config) if args.config else {}, C.parse_overrides(args.set))
            bench = convert(fmt, path, args.out, overwrite=args.overwrite, **opts)
        else:
            from mmunlearn.data.fictitious import FictitiousConfig

            bench = cmd.make_data(args.out, C.load(FictitiousConfig, args.config, args.set), args.overwrite)
        print(f"wrote {len(bench.examples)} examples to {args.out}")
    elif args.command == "finetune":
        from mmunlearn.train.finetune import FinetuneConfig
        from mmunlearn.train.recipes import finetune_preset
        from mmunlearn.validate import check_model

        check_model(args.model, args.family)
        cfg = C.load(FinetuneConfig, args.config, args.set, base=finetune_preset(args.model, args.family))
        rec = cmd.run_finetune(args.data, args.model, args.out, cfg, args.family, args.overwrite, progress,
                               dtype=args.dtype, resume=args.resume)
        print(f"wrote {args.out} (trained in {rec['log']['train_seconds']} s)")
    elif args.command == "unlearn":
        from mmunlearn.train.unlearn import UnlearnConfig, run_unlearn

        base = {"method": args.method} if args.method else {}
        cfg = C.load(UnlearnConfig, args.config, args.set, base=base)
        if args.oracle and not args.verify:
            raise ConfigError("--oracle is used by --verify; add --verify")
        rec = run_unlearn(args.data, args.model, args.out, cfg, args.overwrite, progress, args.family,
                          dtype=args.dtype, resume=args.resume)
        c = rec["config"]
        how = f"LoRA r={c['lora']['r']}" if c.get("lora") else "full-parameter"
        print(f"recipe: {rec['recipe']} ({how}, lr {c['lr']}, batch {c['batch_size']}, "
              + (f"{c['steps']} steps" if c.get("steps") else f"{c['epochs']} epochs") + ")")
        print(f"wrote {args.out} ({cfg.method}, {rec['seconds']['total']} s)")
        if args.verify:
            from mmunlearn.verify.options import VerifyConfig

            vcfg = VerifyConfig(entities=rec["forget_entities"])
            res = cmd.run_verify(args.out, args.data, args.model, args.oracle, vcfg, dtype=args.dtype)
            print(f"verdict: {res['verdict']} ({res['files']['markdown']})")
    elif args.command == "verify":
        from mmunlearn.verify.options import VerifyConfig

        vcfg = C.load(VerifyConfig, args.config, args.set)
        res = cmd.run_verify(args.model, args.data, args.reference, args.oracle, vcfg, args.out, dtype=args.dtype)
        print(open(res["files"]["markdown"]).read(), end="")
        print(f"wrote {res['files']['json']}")
    elif args.command == "evaluate":
        from mmunlearn.eval.runner import EvalConfig

        res = cmd.run_evaluate(args.data, args.model, C.load(EvalConfig, args.config, args.set), args.out, progress,
                               dtype=args.dtype)
        print(cmd.results_markdown({args.model: res}))
        if args.out:
            print(f"wrote {args.out}")
    elif args.command == "report":
        from mmunlearn.report import load_results, write_report

        paths = write_report(load_results(args.results), args.out, title=args.title)
        print(f"report: {paths['markdown']} and {paths['html']}")
    elif args.command == "manifest":
        problems = cmd.check_manifest(args.target)
        for line in problems:
            print(line)
        if problems:
            return 1
        from mmunlearn.manifest import summary

        print(summary(args.target))
    elif args.command == "demo":
        from mmunlearn.demo import DemoConfig, defaults, run_demo

        cfg = C.load(DemoConfig, args.config, args.set, base={"fast": args.fast, "model": args.model, **defaults()})
        report = run_demo(args.workdir, cfg, progress=progress)
        print(f"report: {report}")
    return 0


def _says(e: MMUError) -> bool:
    """Whether this process prints the error line: always on one process; with several, rank 0 prints an error
    every rank agreed on (``distributed.agree``) and a rank prints one only it raised."""
    from mmunlearn import distributed as D

    return D.is_main() or not getattr(e, "agreed", False)


def _where() -> str:
    from mmunlearn import distributed as D

    return f" (rank {D.rank()})" if D.world() > 1 and not D.is_main() else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        from mmunlearn import distributed as D

        D.init()  # several processes (accelerate launch): join their group
        if not D.is_main():  # rank 0 alone reports what was done
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        return run(args)
    except RunInterrupted as e:
        if _says(e):
            print(f"mmunlearn {args.command}: {e}{_where()}", file=sys.stderr)
        return 128 + e.signum
    except MMUError as e:
        if _says(e):
            print(f"mmunlearn {args.command}: error: {e}{_where()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
