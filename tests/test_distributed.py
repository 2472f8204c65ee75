"""Several processes (gloo on the CPU, ``accelerate.debug_launcher``): the same run as one process.

2 processes × micro-batch b must end where 1 process × micro-batch b × gradient accumulation 2 ends: the same
global batches (``batch_size`` = 2b), the same averaged gradients, hence the same weights, logs and metrics.
Only rank 0 writes; MMUnlearner's mask holds on every rank; FSDP2's sharded step equals the unwrapped one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

# weights after finetune → unlearn agree to this (float32; the two runs sum the same gradients in another
# order: one process accumulates micro-batch gradients in autograd, two processes add them in an all-reduce)
ATOL = 1e-5
LR = 1e-3  # of the FSDP2 step
METHODS = ("ga_diff", "npo", "mmunlearner")
FINETUNE = ["--set", "steps=3", "--set", "batch_size=4", "--set", "vision_warmup_steps=2", "--set", "warmup_steps=0",
            "--set", "save_every=0"]
UNLEARN = {
    "ga_diff": ["--set", "steps=2"],
    "npo": ["--set", "steps=2"],
    # 2 retain iterations, a masked forget step every 2nd: forget, retain, retain
    "mmunlearner": ["--set", "steps=2", "--set", "method_options.importance_batches=2",
                    "--set", "method_options.interval=2", "--set", "method_options.state=dense"],
}
EVAL = ["--set", "splits=[forget,retain]", "--set", "limit=6", "--set", "protocols=[mllmu,clear]",
        "--set", "cache=false", "--set", "batch_size=4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread here as in the launched processes: a thread count changes float summation order (and
    another test module sets 2 for the whole session)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pipeline(data: str, root: str, accumulation: int) -> None:
    """finetune → unlearn (GA_Diff, NPO, MMUnlearner) → evaluate through the CLI, recording per rank how often
    an output directory was made and what MMUnlearner's masked steps changed."""
    from mmunlearn import distributed as D
    from mmunlearn import outputs
    from mmunlearn.cli import main
    from mmunlearn.train.engine import Engine

    rank, made, masked = D.rank(), [], []
    atomic = outputs.atomic_dir

    def counted(out, *a, **k):
        made.append(Path(out).name)
        return atomic(out, *a, **k)

    step = Engine.step

    def checked(self, fn, mask=None):
        if mask is None:
            return step(self, fn, mask)
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        logs = step(self, fn, mask)
        out_of_mask, in_mask = 0.0, 0
        for n, p in self.model.named_parameters():
            delta = (p.detach() - before[n]).abs()
            m = mask.get(self.base_name(n))
            keep = torch.ones_like(delta, dtype=torch.bool) if m is None else ~m.unpack().to(delta.device)
            out_of_mask = max(out_of_mask, float(delta[keep].max()) if keep.any() else 0.0)
            in_mask += int((delta[~keep] > 0).sum())
        masked.append({"outside_max_change": out_of_mask, "inside_changed": in_mask})
        return logs

    from mmunlearn.models.base import ModelAdapter

    generate, generated = ModelAdapter.generate, []

    def counting(self, items, *a, **k):  # evaluation's generation batches on this rank
        generated.append(len(items))
        return generate(self, items, *a, **k)

    deal, dealt = D.my_batches, []

    def dealing(batches):  # scoring / saliency / reference batches this rank computes
        for b in deal(batches):
            dealt.append(1)
            yield b

    outputs.atomic_dir, Engine.step, ModelAdapter.generate, D.my_batches = counted, checked, counting, dealing
    try:
        acc = ["--set", f"gradient_accumulation={accumulation}"]
        base = str(Path(root) / "vanilla")
        codes = [main(["finetune", "--data", data, "--model", "tiny", "--out", base, "--quiet", *FINETUNE, *acc])]
        for m in METHODS:
            out = str(Path(root) / m)
            codes.append(main(["unlearn", "--data", data, "--model", base, "--method", m, "--out", out, "--quiet",
                               "--set", "batch_size=4", "--set", "save_every=0", *UNLEARN[m], *acc]))
            codes.append(main(["evaluate", "--data", data, "--model", out, "--out", f"{out}.json", "--quiet",
                               *EVAL]))
    finally:
        outputs.atomic_dir, Engine.step, ModelAdapter.generate, D.my_batches = atomic, step, generate, deal
    log = {"world": D.world(), "codes": codes, "made": made, "masked": masked, "generated": generated,
           "dealt": len(dealt)}
    (Path(root) / f"rank{rank}.log.json").write_text(json.dumps(log))


def launched(fn, *args) -> None:
    """Run ``fn(*args)`` in each of 2 forked processes joined by gloo (a fresh accelerate state in each)."""

    def body(*a):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        # accelerate gives each CPU process cores / processes threads unless OMP_NUM_THREADS is set: keep the
        # test's one thread (the same float results as this process, no spinning threads on shared cores)
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        fn(*a)

    from accelerate import debug_launcher

    debug_launcher(body, args=args, num_processes=2)  # forked: nothing is pickled


@pytest.fixture(scope="module")
def runs(small_bench, tmp_path_factory) -> tuple[Path, Path]:
    one = tmp_path_factory.mktemp("one-process")
    two = tmp_path_factory.mktemp("two-processes")
    data = str(small_bench.root)
    pipeline(data, str(one), 2)
    launched(pipeline, data, str(two), 1)
    return one, two


def test_two_processes_write_one_output_each_once(runs):
    _, two = runs
    logs = [json.loads((two / f"rank{r}.log.json").read_text()) for r in (0, 1)]
    assert [log["world"] for log in logs] == [2, 2]
    assert all(c == 0 for log in logs for c in log["codes"])
    assert logs[0]["made"] == ["vanilla", *METHODS]  # rank 0 made each output directory once
    assert logs[1]["made"] == []  # rank 1 never did
    dirs = sorted(p.name for p in two.iterdir() if p.is_dir())
    assert dirs == sorted(["vanilla", *METHODS])  # no temporary or per-rank directories left
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]
    for m in METHODS:
        rec = json.loads((two / m / "mmunlearn_run.json").read_text())
        assert rec["processes"] == 2


def test_batches_are_shared_out_not_repeated(runs):
    """Evaluation, saliency and reference batches: each computed once, on one rank; both ranks get work."""
    one, two = runs
    alone = json.loads((one / "rank0.log.json").read_text())
    shares = [json.loads((two / f"rank{r}.log.json").read_text()) for r in (0, 1)]
    assert sum(sum(s["generated"]) for s in shares) == sum(alone["generated"])  # every prompt generated once
    assert sum(s["dealt"] for s in shares) == alone["dealt"]
    assert all(s["dealt"] >= alone["dealt"] // 3 for s in shares), [s["dealt"] for s in shares]


def test_two_processes_equal_one_process_with_accumulation(runs):
    one, two = runs
    for name in ("vanilla", *METHODS):
        wa, wb = load_file(str(one / name / "model.safetensors")), load_file(str(two / name / "model.safetensors"))
        assert wa.keys() == wb.keys()
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert worst <= ATOL, f"{name}: weights differ by up to {worst}"
    for m in METHODS:
        ra, rb = (json.loads((d / m / "mmunlearn_run.json").read_text()) for d in (one, two))
        assert len(ra["history"]) == len(rb["history"])
        for sa, sb in zip(ra["history"], rb["history"]):
            assert sa.keys() == sb.keys()
            for k in sa:
                assert sa[k] == pytest.approx(sb[k], abs=1e-4), (m, k)
        ea, eb = (json.loads(Path(f"{d / m}.json").read_text()) for d in (one, two))
        assert ea["results"] == eb["results"], m  # evaluation: items sharded and gathered, the same JSON
    for f in ("masks.safetensors", "mask_stats.json"):
        assert (one / "mmunlearner" / f).read_bytes() == (two / "mmunlearner" / f).read_bytes()


def test_unlearning_moved_the_weights(runs):
    """The comparison above is not vacuous: each method changed the vanilla weights."""
    _, two = runs
    base = load_file(str(two / "vanilla" / "model.safetensors"))
    for m in METHODS:
        w = load_file(str(two / m / "model.safetensors"))
        assert max(float((w[k] - base[k]).abs().max()) for k in w) > 1e-4, m


def test_mmunlearner_mask_holds_on_every_rank(runs):
    one, two = runs
    for root, ranks in ((one, (0,)), (two, (0, 1))):
        for r in ranks:
            masked = json.loads((root / f"rank{r}.log.json").read_text())["masked"]
            assert masked, f"rank {r}: no masked step ran"
            for s in masked:
                assert s["outside_max_change"] == 0.0, f"rank {r}: entries outside the mask moved"
                assert s["inside_changed"] > 0, f"rank {r}: the masked step moved nothing"


# ---- a failure on one rank stops every rank with the same error --------------------------------------------


def fail_on_rank1(root: str) -> None:
    from mmunlearn import distributed as D
    from mmunlearn.errors import DataError

    def work():
        if D.rank() == 1:
            raise DataError("image x.png does not decode")
        return "fine"

    try:
        D.agree(work)
        result = "no error"
    except DataError as e:
        result = f"{type(e).__name__}: {e} agreed={getattr(e, 'agreed', False)}"
    (Path(root) / f"agree{D.rank()}.txt").write_text(result)


def test_an_error_on_one_rank_reaches_every_rank(tmp_path):
    launched(fail_on_rank1, str(tmp_path))
    for r in (0, 1):
        assert (tmp_path / f"agree{r}.txt").read_text() == "DataError: image x.png does not decode agreed=True"


# ---- FSDP2: one sharded training step equals the unwrapped step ------------------------------------------------


def tiny_batches(bench_root: str):
    from mmunlearn.commands import open_model
    from mmunlearn.data.batches import ImageCache, to_items
    from mmunlearn.data.schema import Benchmark

    bench = Benchmark.load(bench_root)
    adapter = open_model("tiny", bench)
    vqa = [e for e in bench.examples if e.purpose == "train" and e.kind == "vqa"][:2]
    qa = [e for e in bench.examples if e.purpose == "train" and e.kind == "qa"][:1]
    images = ImageCache(bench)
    # rank 0: an image micro-batch; rank 1: a text-only one (the vision tower still runs there, on a blank image)
    return adapter, [adapter.encode(to_items(vqa, images)), adapter.encode(to_items(qa, images))]


def one_step(adapter, batches, fsdp: bool):
    from mmunlearn.methods.base import batch_ce
    from mmunlearn.train.engine import Engine, OptimConfig

    engine = Engine(adapter, OptimConfig(lr=LR, max_steps=1, scheduler="constant", fsdp=fsdp))
    return engine.step([lambda b=b: (batch_ce(adapter, b), {}) for b in batches])


def fsdp_step(bench_root: str, out: str) -> None:
    from mmunlearn import distributed as D
    from mmunlearn.train.fsdp import full_state, is_sharded

    adapter, batches = tiny_batches(bench_root)
    logs = one_step(adapter, [batches[D.rank()]], fsdp=True)
    state = full_state(adapter.model)
    if D.is_main():
        torch.save({"state": state, "logs": logs, "sharded": is_sharded(adapter.model)}, out)


def test_fsdp2_step_equals_the_unwrapped_step(small_bench, tmp_path):
    out = tmp_path / "fsdp.pt"
    launched(fsdp_step, str(small_bench.root), str(out))
    got = torch.load(out, weights_only=True)
    assert got["sharded"]
    adapter, batches = tiny_batches(str(small_bench.root))
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    logs = one_step(adapter, batches, fsdp=False)  # one process, the two micro-batches accumulated
    assert got["logs"]["loss"] == pytest.approx(logs["loss"], rel=1e-6)
    assert got["logs"]["grad_norm"] == pytest.approx(logs["grad_norm"], rel=1e-5)
    params = dict(adapter.model.named_parameters())
    assert got["state"].keys() == params.keys()
    diff = {n: (got["state"][n] - p.detach()).abs() for n, p in params.items()}
    worst = max(float(d.max()) for d in diff.values())
    off = sum(int((d > ATOL).sum()) for d in diff.values()) / sum(d.numel() for d in diff.values())
    # AdamW's first update is lr·g/(|g| + ε): where a gradient is within a few ε of zero, the reduce-scatter's
    # float rounding moves it by a few % of lr; everywhere else the two steps agree to ATOL
    assert worst <= 0.05 * LR, f"FSDP2 step differs by up to {worst}"
    assert off <= 1e-3, f"{off:.2%} of the entries differ by more than {ATOL}"
    vision = [n for n in params if n.startswith("model.vision_tower.")]
    assert any(not torch.equal(params[n].detach(), before[n]) for n in vision)  # the image micro-batch trained it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def fsdp_pipeline(data: str, one: str, root: str) -> None:
    """finetune and GA_Diff under FSDP2 through the CLI (GA_Diff from the one-process vanilla model)."""
    from mmunlearn.cli import main

    fsdp = ["--set", "fsdp=true", "--set", "gradient_accumulation=1"]
    codes = [main(["finetune", "--data", data, "--model", "tiny", "--out", f"{root}/vanilla", "--quiet", *FINETUNE,
                   *fsdp]),
             main(["unlearn", "--data", data, "--model", f"{one}/vanilla", "--method", "ga_diff", "--out",
                   f"{root}/ga_diff", "--quiet", "--set", "batch_size=4", "--set", "save_every=0",
                   *UNLEARN["ga_diff"], *fsdp])]
    Path(root, "codes.json").write_text(json.dumps(codes))


def test_fsdp2_finetune_and_unlearn_equal_one_process(runs, small_bench, tmp_path):
    from mmunlearn.models import load_adapter

    one, _ = runs
    launched(fsdp_pipeline, str(small_bench.root), str(one), str(tmp_path))
    assert json.loads((tmp_path / "codes.json").read_text()) == [0, 0]
    for name in ("vanilla", "ga_diff"):
        a, b = (load_adapter(d / name, device="cpu") for d in (one, tmp_path))  # the saved directories load
        pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
        worst = max(float((pa[k].detach() - pb[k].detach()).abs().max()) for k in pa)
        assert worst <= ATOL, f"{name}: FSDP2 run differs from one process by up to {worst}"


def unlearn_failing_on_rank1(data: str, base: str, root: str) -> None:
    """GA_Diff whose loss fails on rank 1 only, at the second step: the CLI's exit code and stderr per rank."""
    import contextlib
    import io

    from mmunlearn import distributed as D
    from mmunlearn.cli import main
    from mmunlearn.errors import DataError
    from mmunlearn.methods.ga_diff import GradientDifference

    loss, calls = GradientDifference.loss, []

    def failing(self, ctx, batches):
        calls.append(1)
        if D.rank() == 1 and len(calls) == 2:
            raise DataError("examples.jsonl line 7: answer is empty")
        return loss(self, ctx, batches)

    GradientDifference.loss = failing
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(["unlearn", "--data", data, "--model", base, "--method", "ga_diff", "--out", f"{root}/out",
                         "--quiet", "--set", "batch_size=4", "--set", "steps=3"])
    finally:
        GradientDifference.loss = loss
    Path(root, f"fail{D.rank()}.json").write_text(json.dumps({"code": code, "stderr": err.getvalue()}))


def test_a_failure_on_one_rank_stops_both_with_one_line(runs, small_bench, tmp_path):
    one, _ = runs
    launched(unlearn_failing_on_rank1, str(small_bench.root), str(one / "vanilla"), str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"fail{r}.json").read_text()) for r in (0, 1))
    assert r0["code"] == r1["code"] == 2
    assert r0["stderr"] == "mmunlearn unlearn: error: examples.jsonl line 7: answer is empty\n"
    assert r1["stderr"] == ""  # the same error, printed once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fail0.json", "fail1.json"]  # no output, no temp dir
