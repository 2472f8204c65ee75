"""Verification on the demo configuration (slow: trains the vanilla model and the oracle, about 2 x 3 minutes on
2 cores). ``MMU_DEMO_WORKDIR`` points at a demo work directory to reuse its trained models (the demo trains only
what is missing there); evaluation and verification are always recomputed."""

import os

import pytest

from mmunlearn.commands import open_model
from mmunlearn.data.batches import ImageCache
from mmunlearn.data.schema import Benchmark
from mmunlearn.demo import DemoConfig, run_demo
from mmunlearn.eval.scoring import rank_options
from mmunlearn.outputs import read_json_object
from mmunlearn.verify.attacks import quantized_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = os.environ.get("MMU_DEMO_WORKDIR") or str(tmp_path_factory.mktemp("demo"))
    cfg = DemoConfig(methods=("po", "ga", "npo"))
    run_demo(work, cfg, progress=False)
    return work, read_json_object(os.path.join(work, "results.json"))["models"]


def _recovery(v: dict) -> float:
    return max(r["recovery"] for r in v["summary"]["relearn"].values() if r["recovery"] is not None)


def test_vanilla_is_distinguishable_from_the_oracle(demo):
    _, models = demo
    assert models["vanilla"]["verification"]["summary"]["forget_quality"]["vqa"] < 0.05
    assert models["oracle"]["verification"]["summary"]["forget_quality"]["vqa"] == pytest.approx(1.0)


def test_relearning_does_not_lower_what_vanilla_knows(demo):
    _, models = demo
    for name, r in models["vanilla"]["verification"]["summary"]["relearn"].items():
        assert r["after"] >= r["before"] - 5, (name, r)


def test_refusal_tuning_relearns_more_than_the_oracle(demo):
    _, models = demo
    po, oracle = _recovery(models["po"]["verification"]), _recovery(models["oracle"]["verification"])
    print({n: _recovery(m["verification"]) for n, m in models.items() if n != "vanilla"})
    assert po >= oracle + 0.25, (po, oracle)


def test_int8_keeps_the_tiny_models_predictions(demo):
    """8-bit RTN keeps the tiny model's multiple-choice predictions. 2-bit is printed, not asserted: the tiny
    model trained from scratch keeps 94-97 % of its predictions even with ternary weights, so the "2 bits
    destroy a model" half of the check runs on the real pretrained model (tests/test_smol.py)."""
    work, _ = demo
    bench = Benchmark.load(os.path.join(work, "data"))
    adapter = open_model(os.path.join(work, "vanilla"), bench)
    ex = [e for e in bench.examples if e.task == "mc" and e.purpose == "eval"]
    images = ImageCache(bench)
    base = rank_options(adapter, ex, images)
    same = {}
    for scheme in ("int8", "int2"):
        pred = rank_options(quantized_copy(adapter, scheme), ex, images)
        same[scheme] = 100.0 * sum(a == b for a, b in zip(pred, base)) / len(ex)
    print(same)
    assert same["int8"] >= 95, same
