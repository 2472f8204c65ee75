"""What a method must achieve on the built-in benchmark, as data: the bounds the sweep (``bench/sweep.py``)
and the report check, each relative to the vanilla model or absolute.

Specificity is part of every method's bounds: an unlearned model must still name the people it was not asked to
forget, on their unlearning-time images (``retain`` VQA identity answers) and on held-out images
(``name_rate_heldout``), and still describe them in free text (``retain`` QA generation ROUGE-L), not only keep
their multiple choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """``split.kind.metric`` ``op`` ``limit`` (absolute), or ``op`` ``limit`` × the vanilla model's value."""

    split: str
    kind: str
    metric: str
    op: str  # "<=" or ">="
    limit: float
    relative: bool = False  # True: limit is a fraction of vanilla's value

    @property
    def label(self) -> str:
        rhs = f"{self.limit:g} × vanilla" if self.relative else f"{self.limit:g}"
        return f"{self.split} {self.kind} {self.metric} {self.op} {rhs}"

    def check(self, results: dict, vanilla: dict | None) -> dict[str, Any]:
        """{bound, value, limit, ok}; ok is None when the value (or vanilla's, for a relative bound) is missing."""
        value = _get(results, self.split, self.kind, self.metric)
        limit: float | None = self.limit
        if self.relative:
            ref = _get(vanilla or {}, self.split, self.kind, self.metric)
            limit = None if ref is None else self.limit * ref
        ok = None if value is None or limit is None else (value <= limit if self.op == "<=" else value >= limit)
        return {"bound": self.label, "value": value, "limit": limit, "ok": ok}


def _get(results: dict, split: str, kind: str, metric: str) -> float | None:
    """A finite number, else None (missing, not a number, NaN or inf: not measured)."""
    r = results.get(split)
    r = r.get(kind) if isinstance(r, dict) else None
    v = r.get(metric) if isinstance(r, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _keep(split: str, kind: str, metric: str, fraction: float) -> Bound:
    return Bound(split, kind, metric, ">=", fraction, relative=True)


# specificity: naming the retained people (their unlearning-time image, their held-out images) and describing
# them in free text (ROUGE-L of the "Tell me about <name>" biography), each kept at 85 % of vanilla
SPECIFICITY = (_keep("retain", "vqa", "name_rate", 0.85), _keep("retain", "vqa", "name_rate_heldout", 0.85),
               _keep("retain", "qa", "gen_rougeL", 0.85))
VANILLA = tuple(Bound(s, k, "mc_acc", ">=", 95.0) for s in ("forget", "retain", "test") for k in ("vqa", "qa"))
BOUNDS: dict[str, tuple[Bound, ...]] = {
    "vanilla": VANILLA,
    "mmunlearner": (
        Bound("forget", "vqa", "mc_acc", "<=", 35.0), _keep("forget", "qa", "mc_acc", 0.85),
        _keep("retain", "vqa", "mc_acc", 0.9), _keep("retain", "qa", "mc_acc", 0.9), *SPECIFICITY,
    ),
    "siu": (
        Bound("test", "vqa", "name_rate", "<=", 10.0), _keep("retain", "vqa", "mc_acc", 0.9), *SPECIFICITY,
        _keep("forget", "qa", "mc_acc", 0.85),
    ),
}


def check(method: str, results: dict, vanilla: dict | None) -> list[dict[str, Any]]:
    """Every bound of ``method`` (none for a method without bounds) against its per-split results."""
    return [b.check(results, vanilla) for b in BOUNDS.get(method, ())]
