"""Each published format end to end: convert -> unlearn one step with two methods -> evaluate."""

import pytest

from fixtures_formats import SHARED_SIU, write_clear, write_mllmu, write_mmubench
from mmunlearn.commands import export, open_model, run_evaluate
from mmunlearn.data.convert import convert
from mmunlearn.data.schema import Benchmark
from mmunlearn.eval.runner import EvalConfig
from mmunlearn.train.unlearn import UnlearnConfig, run_unlearn


def _pipeline(bench: Benchmark, forget_set: str, methods: tuple[str, ...], tmp_path) -> None:
    vanilla = tmp_path / "vanilla"
    export(open_model("tiny", bench), vanilla)  # the tiny model, built for this benchmark's vocabulary
    for method in methods:
        out = tmp_path / method
        cfg = UnlearnConfig(method=method, forget_set=forget_set, steps=1, batch_size=2)
        rec = run_unlearn(str(bench.root), str(vanilla), str(out), cfg, progress=False)
        assert rec["steps"] == 1 and (out / "model.safetensors").is_file()
        ecfg = EvalConfig(forget_set=forget_set, max_new_tokens=4, batch_size=16, reference=str(vanilla), limit=8)
        res = run_evaluate(str(bench.root), str(out), ecfg, progress=False)["results"]
        assert "forget" in res or "test" in res
        assert "mmubench" in res and "mllmu" in res and "clear" in res


def test_mllmu_bench_pipeline(tmp_path):
    bench = convert("mllmu-bench", write_mllmu(tmp_path / "src"), tmp_path / "bench")
    _pipeline(bench, "forget05", ("ga_diff", "npo"), tmp_path)


def test_clear_pipeline(tmp_path):
    bench = convert("clear", write_clear(tmp_path / "src"), tmp_path / "bench")
    _pipeline(bench, "forget01", ("ga_diff", "npo"), tmp_path)


@pytest.mark.skipif(not SHARED_SIU.is_dir(), reason="the MMUBench release files (../shared/data) are absent")
def test_mmubench_pipeline(tmp_path):
    data, _ = write_mmubench(tmp_path / "src")
    bench = convert("mmubench", data, tmp_path / "bench")
    _pipeline(bench, "concept", ("ga", "ga_kl"), tmp_path)
