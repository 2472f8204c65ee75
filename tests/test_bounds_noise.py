"""The methods' bounds as data, and the noise test that tells a difference from the questions' chance."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmunlearn.eval.bounds import BOUNDS, Bound, check
from mmunlearn.eval.noise import mean_sd, within_noise


def res(**metrics):
    out: dict = {}
    for key, v in metrics.items():
        split, kind, metric = key.split("__")
        out.setdefault(split, {}).setdefault(kind, {})[metric] = v
    return out


def test_absolute_and_relative_bounds():
    vanilla = res(forget__qa__mc_acc=80.0)
    assert Bound("forget", "vqa", "mc_acc", "<=", 35).check(res(forget__vqa__mc_acc=35.0), vanilla)["ok"] is True
    assert Bound("forget", "vqa", "mc_acc", "<=", 35).check(res(forget__vqa__mc_acc=35.1), vanilla)["ok"] is False
    keep = Bound("forget", "qa", "mc_acc", ">=", 0.85, relative=True)
    c = keep.check(res(forget__qa__mc_acc=68.0), vanilla)
    assert c["limit"] == pytest.approx(68.0) and c["ok"] is True
    assert keep.check(res(forget__qa__mc_acc=67.9), vanilla)["ok"] is False
    assert keep.check(res(forget__qa__mc_acc=90.0), None)["ok"] is None  # no vanilla: not measured
    assert keep.check(res(), vanilla)["ok"] is None
    assert keep.check(res(forget__qa__mc_acc=float("nan")), vanilla)["ok"] is None  # NaN: not measured


def test_every_method_with_bounds_checks_specificity():
    for method in ("mmunlearner", "siu"):
        metrics = {(b.split, b.kind, b.metric) for b in BOUNDS[method]}
        assert ("retain", "vqa", "name_rate") in metrics and ("retain", "vqa", "name_rate_heldout") in metrics
        assert ("retain", "qa", "gen_rougeL") in metrics
    assert check("ga", res(), res()) == []  # no bounds: nothing to check
    assert len(check("vanilla", res(), None)) == 6


def test_noise_from_question_counts():
    assert within_noise([70.0], [75.0], 60, 60)  # 3 questions of 60: chance
    assert not within_noise([20.0], [95.0], 60, 60)
    assert not within_noise([90.0], [95.0], 10_000, 10_000)  # the same gap with many questions is real
    assert not within_noise([70.0], [75.0])  # one run and no counts: never called noise
    assert within_noise([100.0], [100.0], 10, 10)


def test_noise_from_seeds():
    assert within_noise([70.0, 80.0, 75.0], [72.0, 79.0, 74.0])
    assert not within_noise([10.0, 11.0, 10.5], [90.0, 91.0, 90.5])
    assert within_noise([50.0, 50.0], [50.0, 50.0]) and not within_noise([50.0, 50.0], [60.0, 60.0])
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_sd([4.0]) == (4.0, 0.0)


@given(st.floats(0, 100), st.floats(0, 100), st.integers(1, 500), st.integers(1, 500))
def test_noise_is_symmetric(a, b, na, nb):
    assert within_noise([a], [b], na, nb) == within_noise([b], [a], nb, na)
