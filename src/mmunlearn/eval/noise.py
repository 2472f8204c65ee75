"""Is a difference between two models a result or noise? Seeds when there are several, question counts when
there is one.

With two or more runs (seeds) per model, a difference is within the noise when Welch's t-test does not reject
equal means at ``ALPHA`` (runs vary by seed: data, initialisation, batches). With one run each, the only noise
left to measure is the questions' own: a two-proportion z-test on the accuracies (in %) and the numbers of
questions behind them (``mc_n``), at the same level.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence

from scipy import stats

ALPHA = 0.05


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def within_noise(a: Sequence[float], b: Sequence[float], n_a: int | None = None, n_b: int | None = None) -> bool:
    """True when the values ``a`` and ``b`` (one per run) do not differ significantly at ``ALPHA``.

    ``n_a``, ``n_b``: the questions behind a single run's percentage (used only when a side has one run; a
    single run without a question count is never called noise).
    """
    if not a or not b:
        raise ValueError("within_noise needs at least one value on each side")
    if len(a) > 1 and len(b) > 1:
        ma, sa = mean_sd(a)
        mb, sb = mean_sd(b)
        if sa == 0 and sb == 0:
            return ma == mb
        with warnings.catch_warnings():  # near-identical runs: scipy warns of precision, the p-value stands
            warnings.simplefilter("ignore", RuntimeWarning)
            return bool(stats.ttest_ind(a, b, equal_var=False).pvalue >= ALPHA)
    if not n_a or not n_b:
        return statistics.fmean(a) == statistics.fmean(b)
    pa, pb = statistics.fmean(a) / 100, statistics.fmean(b) / 100
    pooled = (pa * n_a + pb * n_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return pa == pb
    return bool(2 * stats.norm.sf(abs(pa - pb) / se) >= ALPHA)
