"""A report of one or more evaluations: Markdown and a self-contained HTML page with tables and plots.

Input is the ``results.json`` of ``mmunlearn demo`` (layout in docs/results.md) and/or single-model files of
``mmunlearn evaluate --out``; ``write_report(load_results(paths), out_dir)`` writes ``report.md``,
``report.html`` and PNG plots into ``out_dir``. What the report contains is described in docs/report.md.

The content is built once as a list of blocks (headings, paragraphs, tables, images) and rendered twice, so the
Markdown and the HTML always say the same thing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmunlearn.errors import ConfigError, DataError
from mmunlearn.outputs import read_json_object

MISSING = "–"
SPLITS = ("forget", "retain", "test", "utility")
PERCENT_METRICS = {"mc_acc", "gen_em", "name_rate", "name_rate_heldout", "cloze_acc"}
# The number of questions behind each percentage, for the noise marks (the first key present counts). name_rate:
# the identity answers when counted apart, else every generation of the unit (on the built-in benchmark every VQA
# generation is an identity question).
COUNTS = {"mc_acc": ("mc_n",), "cloze_acc": ("cloze_n",), "gen_em": ("gen_n",), "name_rate": ("name_n", "gen_n"),
          "name_rate_heldout": ("name_heldout_n",)}
NOISE = "≈"  # marks a value within the noise of vanilla's
NOT_INFORMATIVE = "n/i"
PROTOCOL_NAMES = {"mmubench": "MMUBench", "mllmu": "MLLMU-Bench", "clear": "CLEAR"}
REFERENCE = "vanilla"

# (split, kind, metric, column label, better direction). "≈oracle": closer to the oracle (the model retrained without
# the forget data) is better: the forget entities' visual questions (forget split, and the test split's held-out
# images); below the oracle (e.g. MC below chance) is not better, it still carries the information. "↑": higher =
# better: knowledge to keep, including the forget entities' text-only QA (entity *visual* unlearning keeps it).
FORGET = "≈oracle"
MAIN_COLUMNS = [
    ("forget", "vqa", "mc_acc", "forget VQA MC", FORGET), ("forget", "qa", "mc_acc", "forget QA MC", "↑"),
    ("retain", "vqa", "mc_acc", "retain VQA MC", "↑"), ("retain", "qa", "mc_acc", "retain QA MC", "↑"),
    ("test", "vqa", "mc_acc", "test VQA MC", FORGET), ("test", "qa", "mc_acc", "test QA MC", "↑"),
    ("utility", "vqa", "mc_acc", "utility VQA MC", "↑"), ("utility", "qa", "mc_acc", "utility QA MC", "↑"),
    ("forget", "vqa", "name_rate", "name forget", FORGET), ("test", "vqa", "name_rate", "name test", FORGET),
    ("retain", "vqa", "name_rate", "name retain", "↑"),
    ("retain", "vqa", "name_rate_heldout", "name held-out retain", "↑"),
    ("forget", "vqa", "cloze_acc", "cloze forget VQA", FORGET), ("forget", "qa", "cloze_acc", "cloze forget QA", "↑"),
    ("forget", "qa", "gen_rougeL", "ROUGE-L forget QA", "↑"), ("retain", "qa", "gen_rougeL", "ROUGE-L retain", "↑"),
    ("retain", "qa", "gen_ppl", "ppl retain QA", "↓"),
]
BAR_METRICS = PERCENT_METRICS - {"gen_em"}  # the bar chart shares one 0-100 axis


# ----------------------------------------------------------------------------------------------- loading, merging

def load_results(paths: list[str] | list[Path]) -> list[dict]:
    """Read results JSON files (a directory stands for its ``results.json``); ConfigError names a bad file."""
    if not paths:
        raise ConfigError("no results files given: pass one or more results JSON files")
    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir() and (p / "results.json").is_file():
            p = p / "results.json"
        out.append(read_json_object(p, hint=" (from mmunlearn demo or evaluate --out)"))
    return out


def _unique_names(paths: list[str]) -> list[str]:
    """Each path's basename, lengthened only where it collides: ``ga/model`` and ``npo/model``, ``vanilla``."""
    parts = [Path(p).parts or (str(p),) for p in paths]
    ks = [1] * len(parts)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, ks)]
        dup = [i for i, n in enumerate(names) if names.count(n) > 1]
        if not dup:
            return names
        if all(ks[i] >= len(parts[i]) for i in dup):  # the same path twice
            return [f"{n}-{i}" if i in dup else n for i, n in enumerate(names)]
        for i in dup:
            ks[i] = min(ks[i] + 1, len(parts[i]))


def _entry(m: dict, path: str, i: int) -> dict:
    results, history = m.get("results") or {}, m.get("history") or []
    if not isinstance(results, dict) or not isinstance(history, list):
        raise DataError(f"results item {i}: model {path or '?'} needs 'results' as an object and 'history' as a list")
    return {"path": str(path), "results": results, "history": history, "seconds": m.get("seconds"),
            "mode": mode_of(m), "verification": m.get("verification"), "method": m.get("method")}


def mode_of(m: dict) -> str:
    """Which evaluation mode produced a model's numbers: ``paper_exact`` or ``default`` (files written before
    the mode was recorded were default)."""
    cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
    return str(m.get("mode") or ("paper_exact" if cfg.get("paper_exact") else "default"))


def merge_results(results: dict | list[dict]) -> dict:
    """One demo-style object from demo results and/or evaluate files; ``vanilla`` first, then input order.

    Returns ``{"benchmark": {...}, "models": {name: {"path", "results", "history", "seconds"}},
    "timings": [(label, seconds)], "notes": [str]}``.
    """
    items = [results] if isinstance(results, dict) else list(results)
    models: dict[str, dict] = {}
    benchmarks: list[dict] = []
    timings: list[tuple[str, Any]] = []
    evaluated: list[tuple[int, dict]] = []
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise DataError(f"results item {i} is a {type(obj).__name__}, expected a JSON object")
        if "models" in obj:
            if not isinstance(obj["models"], dict):
                raise DataError(f"results item {i}: 'models' must map names to model results")
            bench = obj.get("benchmark")
            benchmarks.append(bench if isinstance(bench, dict) else {})
            for name, m in obj["models"].items():
                if not isinstance(m, dict):
                    raise DataError(f"results item {i}: model {name!r} is not an object")
                models[name if name not in models else f"{name}-{i + 1}"] = _entry(m, m.get("path", ""), i)
            timings += list(_flatten(obj.get("timings_seconds") or {}).items())
        elif "model" in obj and "results" in obj:
            evaluated.append((i, obj))
            cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
            data = str(obj.get("data", ""))
            benchmarks.append({"name": Path(data).name if data else "", "path": data,
                               "forget_set": cfg.get("forget_set", "")})
        else:
            raise DataError(f"results item {i} has neither 'models' (mmunlearn demo) nor 'model' and 'results' "
                            "(mmunlearn evaluate --out)")
    names = _unique_names([str(o["model"]) for _, o in evaluated]) if evaluated else []
    for name, (i, obj) in zip(names, evaluated):
        key = name if name not in models else f"{name}-{len(models) + 1}"
        models[key] = _entry(obj, str(obj["model"]), i)
        if obj.get("seconds") is not None:
            timings.append((f"evaluate {key}", obj["seconds"]))
    if not models:
        raise DataError("no models in the results: expected a non-empty 'models' mapping (mmunlearn demo) or "
                        "evaluate files with 'model' and 'results'")
    if REFERENCE in models:
        models = {REFERENCE: models[REFERENCE], **{k: v for k, v in models.items() if k != REFERENCE}}
    bench = next((b for b in benchmarks if b.get("forget_entities")), benchmarks[0] if benchmarks else {})
    notes = []
    seen = sorted({(str(b.get("path") or b.get("name") or ""), str(b.get("forget_set") or "")) for b in benchmarks})
    if len(seen) > 1:
        notes.append("the results come from different benchmarks or forget sets: "
                     + "; ".join(f"{n or '?'} / {f or '?'}" for n, f in seen) + ", so rows may not be comparable")
    modes = sorted({m["mode"] for m in models.values()})
    if len(modes) > 1:
        notes.append("the results mix evaluation modes (" + ", ".join(modes) + "; see the mode column and "
                     "docs/paper_exact.md), so rows may not be comparable")
    return {"benchmark": bench, "models": models, "timings": timings, "notes": notes}


# ----------------------------------------------------------------------------------------------- values

def _num(v: Any) -> float | None:
    """A finite number, or None (missing, NaN, infinite, boolean, text)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _fmt(v: Any, metric: str = "") -> str:
    x = _num(v)
    if x is None:
        return str(v) if isinstance(v, (str, bool)) and v != "" else MISSING
    if isinstance(v, int):
        return str(v)
    if metric in PERCENT_METRICS or abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def _get(model: dict, split: str, kind: str, metric: str) -> float | None:
    r = model["results"].get(split)
    r = r.get(kind) if isinstance(r, dict) else None
    return _num(r.get(metric)) if isinstance(r, dict) else None


def _count(model: dict, split: str, kind: str, metric: str) -> int | None:
    """The number of questions behind a percentage (``COUNTS``), or None when not recorded."""
    r = model["results"].get(split)
    r = r.get(kind) if isinstance(r, dict) else None
    for key in COUNTS.get(metric, ()):
        n = r.get(key) if isinstance(r, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def within_noise_of(model: dict, ref: dict, split: str, kind: str, metric: str) -> bool:
    """True when the model's percentage differs from the reference's by no more than noise: a two-proportion
    z-test on the two single values and their question counts (``eval.noise.within_noise``, p ≥ 0.05). False when
    a value or a count is missing (no count, no claim) and for equal values (no difference to explain)."""
    from mmunlearn.eval.noise import within_noise

    v, r = _get(model, split, kind, metric), _get(ref, split, kind, metric)
    n_v, n_r = _count(model, split, kind, metric), _count(ref, split, kind, metric)
    if v is None or r is None or n_v is None or n_r is None or v == r:
        return False
    return within_noise([v], [r], n_v, n_r)


def _mark(cell: str, noisy: bool) -> str:
    return f"{NOISE}{cell}" if noisy and cell != MISSING else cell


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists (samples) are dropped."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def _retain_mean(model: dict) -> float | None:
    vals = [v for v in (_get(model, "retain", k, "mc_acc") for k in ("vqa", "qa")) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _present_columns(models: dict[str, dict]) -> list[tuple]:
    return [c for c in MAIN_COLUMNS if any(_get(m, *c[:3]) is not None for m in models.values())]


# ----------------------------------------------------------------------------------------------- document blocks

Inline = str | tuple[str, str]  # plain text, or (text, "code" | "bold")


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    parts: list[Inline]


@dataclass
class Bullets:
    items: list[list[Inline]]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    file: str
    alt: str
    png: bytes


Block = Heading | Para | Bullets | Table | Image


def _noisy(models: dict[str, dict], name: str, col: tuple, ref: str = REFERENCE) -> bool:
    return name != ref and ref in models and within_noise_of(models[name], models[ref], *col[:3])


def _main_table(models: dict[str, dict], cols: list[tuple]) -> Table:
    """One row per model; a value within the noise of vanilla's is prefixed with ``NOISE``."""
    return Table(["method", "mode"] + [f"{c[3]} {c[4]}" for c in cols],
                 [[name, m.get("mode", "default")]
                  + [_mark(_fmt(_get(m, *c[:3]), c[2]), _noisy(models, name, c)) for c in cols]
                  for name, m in models.items()])


def relative_to(models: dict[str, dict], cols: list[tuple], ref: str = REFERENCE) -> Table:
    """Each method's metric as % of the reference model's value (missing, or reference 0, gives "–"); a value
    within the noise of the reference's is prefixed with ``NOISE``."""
    rows = []
    for name, m in models.items():
        if name == ref:
            continue
        cells = []
        for c in cols:
            v, r = _get(m, *c[:3]), _get(models[ref], *c[:3])
            cells.append(MISSING if v is None or not r else _mark(f"{100 * v / r:.1f}%", _noisy(models, name, c, ref)))
        rows.append([name] + cells)
    return Table(["method"] + [f"{c[3]} {c[4]}" for c in cols], rows)


def _any_noise_mark(models: dict[str, dict], cols: list[tuple]) -> bool:
    return any(_noisy(models, n, c) for n in models for c in cols)


NOISE_NOTE = (f"{NOISE} before a value: within the noise of the vanilla model's value, a two-proportion z-test on "
              "the two percentages and their numbers of questions (p ≥ 0.05): the difference could be the "
              "questions' noise alone. Only percentages with a recorded question count are tested; no mark "
              "means a significant difference, no difference at all, or no count.")


def bounds_section(models: dict[str, dict], ref: str = REFERENCE) -> list[Block]:
    """Each bound of ``eval.bounds.BOUNDS`` for every model whose method (or name) has bounds, checked against
    the reference model of the same report; nothing when no model has bounds or there is no reference."""
    from mmunlearn.eval.bounds import BOUNDS

    if ref not in models:
        return []
    vanilla = models[ref]["results"]
    rows = []
    for name, m in models.items():
        method = str(m.get("method") or name).lower()
        for bound in BOUNDS.get(method, ()):
            r = bound.check(m["results"], vanilla)
            verdict = "not measured" if r["ok"] is None else ("met" if r["ok"] else "NOT met")
            label = r["bound"].replace("<=", "≤").replace(">=", "≥")
            rows.append([name, label, _fmt(r["value"], bound.metric), _fmt(r["limit"], bound.metric), verdict])
    if not rows:
        return []
    failed = sorted({r[0] for r in rows if r[4] == "NOT met"}, key=list(models).index)
    return [Heading(2, "Bounds"),
            Para(["What each method must achieve on the built-in benchmark (", ("mmunlearn.eval.bounds", "code"),
                  "), checked against this report's vanilla model: a relative limit is the fraction × vanilla's "
                  "value. ", ("NOT met", "bold"), ": " + (", ".join(failed) if failed else "none") + "."]),
            Table(["model", "bound", "value", "limit", "result"], rows)]


def _not_informative(v: Any) -> dict[str, str]:
    """A protocol result's ``not_informative`` (metric -> reason), e.g. MMUBench's fluency on short answers."""
    ni = v.get("not_informative") if isinstance(v, dict) else None
    return {str(k): str(r) for k, r in ni.items()} if isinstance(ni, dict) else {}


def _protocol_cell(flat: dict[str, Any], why: dict[str, str], k: str) -> str:
    return NOT_INFORMATIVE if k in why and k in flat else _fmt(flat.get(k), k.rsplit(".", 1)[-1])


def _protocol_sections(models: dict[str, dict]) -> list[Block]:
    """Every top-level results key that is not a split, as its own methods x metrics table. A metric the
    results mark not informative shows as ``NOT_INFORMATIVE``, its reason below the table."""
    keys: list[str] = []
    for m in models.values():
        keys += [k for k in m["results"] if k not in SPLITS and k not in keys]
    blocks: list[Block] = []
    for key in keys:
        flat, why = {}, {}
        for name, m in models.items():
            v = m["results"].get(key)
            why[name] = _not_informative(v)
            if isinstance(v, dict):
                v = {k: x for k, x in v.items() if k != "not_informative"}
            flat[name] = _flatten(v) if isinstance(v, dict) else ({} if v is None else {key: v})
        metrics: list[str] = []
        for f in flat.values():
            metrics += [k for k in f if k not in metrics]
        if not metrics:
            continue
        blocks.append(Heading(2, f"Protocol: {PROTOCOL_NAMES.get(key.lower(), key)}"))
        if len(metrics) > 10 and len(metrics) > len(models):  # wide: one row per metric instead
            blocks.append(Table(["metric"] + list(models),
                                [[k] + [_protocol_cell(flat[n], why[n], k) for n in models] for k in metrics]))
        else:
            blocks.append(Table(["method"] + metrics,
                                [[n] + [_protocol_cell(flat[n], why[n], k) for k in metrics] for n in models]))
        notes = [[(NOT_INFORMATIVE, "bold"), f" {n}, ", (k, "code"), f": {r}"]
                 for n in models for k, r in why[n].items() if k in flat[n]]
        if notes:
            blocks += [Para([(NOT_INFORMATIVE, "bold"), " = not informative on this benchmark: the value is kept in "
                             "the results but cannot tell models apart, for the reason given."]), Bullets(notes)]
    return blocks


def _sample_sections(models: dict[str, dict], per_split: int = 3) -> list[Block]:
    """The same prompts answered by every model, the reference model's prompts first."""
    split_order = list(SPLITS) + sorted({s for m in models.values() for s in m["results"]} - set(SPLITS))
    blocks: list[Block] = []
    for split in split_order:
        for kind in ("vqa", "qa"):
            by_model: dict[str, dict[tuple, dict]] = {}
            order: list[tuple] = []
            for name, m in models.items():
                r = m["results"].get(split)
                r = r.get(kind) if isinstance(r, dict) else None
                samples = r.get("samples") if isinstance(r, dict) else None
                for s in samples if isinstance(samples, list) else []:
                    if isinstance(s, dict):
                        key = (str(s.get("prompt", "")), str(s.get("image", "")))
                        by_model.setdefault(name, {})[key] = s
                        if key not in order:
                            order.append(key)
            for key in order[:per_split]:
                first = next(by_model[n][key] for n in models if key in by_model.get(n, {}))
                parts: list[Inline] = [(f"{split} {kind.upper()}", "bold")]
                if key[1]:
                    parts += [" · image ", (key[1], "code")]
                parts += [" · prompt: ", key[0], " · truth: ", str(first.get("answer", MISSING))]
                blocks.append(Para(parts))
                blocks.append(Table(["method", "output"],
                                    [[n, str(by_model.get(n, {}).get(key, {}).get("output", MISSING))]
                                     for n in models]))
    return blocks


def _history_table(models: dict[str, dict]) -> Table:
    rows = []
    for name, m in models.items():
        h = [e for e in m["history"] if isinstance(e, dict)]
        if h:
            steps = [e.get("step") for e in h]
            rows.append([name, str(len(h)), _fmt(steps[-1]), _fmt(h[0].get("loss")), _fmt(h[-1].get("loss"))])
    return Table(["method", "entries", "last step", "first loss", "last loss"], rows)


# ----------------------------------------------------------------------------------------------- plots

def _colours(names: list[str]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan", "tab:red", "tab:gray"]
    others = [n for n in names if n != REFERENCE]
    return {n: "black" if n == REFERENCE else palette[others.index(n) % len(palette)] for n in names}


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_bars(models: dict[str, dict], cols: list[tuple]) -> bytes | None:
    """Grouped bars: one group per key metric (all in %), one bar per method."""
    from matplotlib.figure import Figure

    cols = [c for c in cols if c[2] in BAR_METRICS]
    if not cols:
        return None
    names, colours = list(models), _colours(list(models))
    fig = Figure(figsize=(max(7.0, 1.0 * len(cols) + 2), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, c in enumerate(cols):
            v = _get(models[name], *c[:3])
            if v is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(v)
        ax.bar(xs, ys, width, label=name, color=colours[name], alpha=0.55 if name == REFERENCE else 0.9)
    ax.set_xticks(range(len(cols)), [f"{c[3]} {c[4]}" for c in cols], rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.axhline(25, color="grey", lw=0.8, ls=":")
    ax.set_title("Methods on key metrics (MC chance = 25 %, dotted)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _tradeoff_x(models: dict[str, dict]) -> tuple[str, str] | None:
    for kind in ("vqa", "qa"):
        if any(_get(m, "forget", kind, "mc_acc") is not None for m in models.values()):
            return "forget", kind
    return None


def plot_tradeoff(models: dict[str, dict]) -> bytes | None:
    """x = forget MC accuracy (VQA, else QA), y = mean retain MC accuracy; upper-left is the goal."""
    from matplotlib.figure import Figure

    xk = _tradeoff_x(models)
    pts = [(n, _get(m, *xk, "mc_acc"), _retain_mean(m)) for n, m in models.items()] if xk else []
    pts = [(n, x, y) for n, x, y in pts if x is not None and y is not None]
    if not pts:
        return None
    colours = _colours(list(models))
    fig = Figure(figsize=(6.0, 5.0))
    ax = fig.add_subplot()
    for n, x, y in pts:
        ref = n == REFERENCE
        ax.scatter([x], [y], s=220 if ref else 60, marker="*" if ref else "o", color=colours[n], zorder=3,
                   edgecolors="gold" if ref else "none", linewidths=1.0)
        ax.annotate(n, (x, y), xytext=(6, 5), textcoords="offset points", fontsize=9,
                    fontweight="bold" if ref else "normal")
        if ref:
            ax.axvline(x, color="black", lw=0.6, ls="--", alpha=0.4)
            ax.axhline(y, color="black", lw=0.6, ls="--", alpha=0.4)
    ax.axvline(25, color="grey", lw=0.8, ls=":")
    ax.text(25, 1, " chance", color="grey", fontsize=8)
    ax.text(2, 98, "good: forgotten, retained", color="tab:green", fontsize=9, va="top")
    ax.text(98, 2, "bad: remembered, lost", color="tab:red", fontsize=9, ha="right")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"{xk[0]} {xk[1].upper()} MC accuracy (%)  ← more forgotten")
    ax.set_ylabel("retain MC accuracy, mean of VQA and QA (%)  ↑ better")
    ax.set_title("Forget vs retain trade-off")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_curves(models: dict[str, dict]) -> bytes | None:
    """One panel per logged quantity (loss first, at most 4), one line per method, against the step."""
    from matplotlib.figure import Figure

    hist = {n: [e for e in m["history"] if isinstance(e, dict)] for n, m in models.items()}
    hist = {n: h for n, h in hist.items() if h}
    keys: list[str] = []
    for h in hist.values():
        for e in h:
            keys += [k for k, v in e.items() if k != "step" and k not in keys and _num(v) is not None]
    keys = (["loss"] if "loss" in keys else []) + [k for k in keys if k != "loss"]
    if not keys:
        return None
    keys, colours = keys[:4], _colours(list(models))
    fig = Figure(figsize=(4.2 * len(keys), 3.4))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for n, h in hist.items():
            pts = [(_num(e.get("step", j)), _num(e.get(key))) for j, e in enumerate(h)]
            pts = [(s, v) for s, v in pts if s is not None and v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=n, color=colours[n], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------------------- the document

def build_blocks(merged: dict, title: str) -> list[Block]:
    """The whole report as blocks, plots included (as PNG bytes)."""
    models, bench = merged["models"], merged["benchmark"]
    cols = _present_columns(models)
    ents = bench.get("forget_entities") or []
    intro: list[Inline] = ["Benchmark ", (str(bench.get("name") or "?"), "code"), ", forget set ",
                           (str(bench.get("forget_set") or "?"), "code")]
    if ents:
        intro.append(f" ({len(ents)} entities: {', '.join(map(str, ents[:12]))}{', …' if len(ents) > 12 else ''})")
    intro.append(f"; {len(models)} models.")
    blocks: list[Block] = [Heading(1, title), Para(intro)]
    blocks += [Para([("Note: ", "bold"), n]) for n in merged["notes"]]
    blocks.append(Bullets([[(n, "bold"), ": ", (m["path"], "code") if m["path"] else MISSING]
                           for n, m in models.items()]))
    blocks += [Heading(2, "How to read the tables"), Bullets([
        [("MC", "bold"), ": 4-option multiple-choice accuracy in % (chance 25 %). VQA questions come with the "
         "person's image, QA questions are text only."],
        [("forget", "bold"), ": the entities to forget; ", ("test", "bold"), ": the same entities on held-out "
         "images and paraphrased questions (does forgetting generalise?); ", ("retain", "bold"),
         ": all other entities; ", ("utility", "bold"), ": shapes, colours and general facts."],
        [("name", "bold"), ": % of identity answers that contain the person's name; ",
         ("name held-out retain", "bold"), ": the same on held-out images of the retained people (images no "
         "training saw), the specificity that multiple choice does not show."],
        [("cloze", "bold"), ": % of fill-in answers that contain the ground truth; ", ("ROUGE-L", "bold"),
         ": F1 in [0, 1] of text-only generations against the reference; ", ("ppl", "bold"),
         ": perplexity of the reference answers (↓ = lower is better; on retain, the language kept)."],
        [(FORGET, "bold"), ": closer to the oracle is better (the ", ("oracle", "code"), " row: the same recipe "
         "trained without the forget data; without one, chance level for MC). Lower is not better: a model below "
         "the oracle, e.g. below chance, still carries the information. ", ("↑", "bold"), ": higher = better "
         "(knowledge to keep, the forget entities' text-only QA included). A good method brings the ", FORGET,
         " columns to the oracle's values while keeping the ↑ columns at the vanilla model's level; ", MISSING,
         " = not measured."],
    ])]
    blocks += [Heading(2, "Comparison"), _main_table(models, cols) if cols else Para(["No split metrics found."])]
    marks = bool(cols) and _any_noise_mark(models, cols)
    if marks:
        blocks.append(Para([NOISE_NOTE]))
    if REFERENCE in models and len(models) > 1 and cols:
        blocks += [Heading(2, "Relative to vanilla"),
                   Para(["Each metric as % of the vanilla model's value (100% = unchanged). ", FORGET,
                         " columns should fall to the oracle's level (chance-level MC is 25 / vanilla), ↑ columns "
                         "should stay near 100%."] + ([f" {NOISE}: within the noise of vanilla's value, as in the "
                                                        "comparison table."] if marks else [])),
                   relative_to(models, cols)]
    blocks += bounds_section(models)
    plots: list[tuple[str, str, bytes | None]] = [
        ("methods_bars.png", "grouped bars: methods on key metrics", plot_bars(models, cols)),
        ("tradeoff.png", "forget vs retain trade-off", plot_tradeoff(models)),
    ]
    shown = [(f, a, p) for f, a, p in plots if p is not None]
    if shown:
        blocks += [Heading(2, "Plots"),
                   Para(["Trade-off: x = forget MC accuracy (left = more forgotten), y = mean retain MC accuracy "
                         "(up = more kept); the vanilla model is the star. Upper-left is good, lower-right bad."])]
        blocks += [Image(f, a, p) for f, a, p in shown]
    from mmunlearn.verify.tables import verification_blocks

    blocks += verification_blocks(models)
    blocks += _protocol_sections(models)
    samples = _sample_sections(models)
    if samples:
        blocks += [Heading(2, "Example generations"),
                   Para(["The same prompts answered by each model (vanilla = before unlearning)."])] + samples
    curves = plot_curves(models)
    if curves is not None:
        blocks += [Heading(2, "Training curves"), _history_table(models),
                   Image("curves.png", "per-step training curves", curves)]
    timings = [(k, v) for k, v in merged["timings"] if _num(v) is not None]
    if timings:
        blocks += [Heading(2, "Timings"), Table(["step", "seconds"], [[k, _fmt(v)] for k, v in timings])]
    return blocks


# ----------------------------------------------------------------------------------------------- rendering

def _md_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", " ").replace("\n", " ")


def _md_inline(parts: list[Inline]) -> str:
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(_md_text(p))
        elif p[1] == "code":
            t = p[0].replace("\n", " ")
            out.append(f"`` {t} ``" if "`" in t else f"`{t}`")
        else:
            out.append(f"**{_md_text(p[0])}**")
    return "".join(out)


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + _md_text(b.text), ""]
        elif isinstance(b, Para):
            lines += [_md_inline(b.parts), ""]
        elif isinstance(b, Bullets):
            lines += ["- " + _md_inline(i) for i in b.items] + [""]
        elif isinstance(b, Table):
            cell = lambda s: _md_text(s).replace("|", "\\|")
            lines.append("| " + " | ".join(cell(h) for h in b.header) + " |")
            right = [i > 0 and all(_is_numeric_cell(r[i]) for r in b.rows) for i in range(len(b.header))]
            lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
            lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in b.rows] + [""]
        elif isinstance(b, Image):
            lines += [f"![{_md_text(b.alt)}]({b.file})", ""]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}th{background:#f2f2f2}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even) td{background:#fafafa}
code{background:#f2f2f2;padding:0 .25em;border-radius:3px}img{max-width:100%;display:block;margin:.5em 0 1.5em}
h1{border-bottom:2px solid #ddd}h2{border-bottom:1px solid #eee;margin-top:1.6em}"""


def _html_inline(parts: list[Inline]) -> str:
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(html.escape(p))
        else:
            tag = "code" if p[1] == "code" else "strong"
            out.append(f"<{tag}>{html.escape(p[0])}</{tag}>")
    return "".join(out)


def _is_numeric_cell(s: str) -> bool:
    try:
        float(s.removeprefix(NOISE).rstrip("%"))
        return True
    except ValueError:
        return s in (MISSING, NOT_INFORMATIVE)


def render_html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_html_inline(b.parts)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join(
                "<tr>" + "".join(f'<td class="n">{html.escape(c)}</td>' if i and _is_numeric_cell(c)
                                 else f"<td>{html.escape(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(b.alt)}">')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------- writing

def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(results: dict | list[dict], out_dir: str | Path, title: str = "mmunlearn report") -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``out_dir`` (created if needed).

    ``results``: a demo ``results.json`` object, an ``evaluate --out`` object, or a list mixing both.
    Returns ``{"markdown", "html", "methods_bars", "tradeoff", "curves", "recovery"}`` -> path, for the files
    written (a plot with nothing to show is left out). Each file is written to a temporary name and renamed.
    """
    merged = merge_results(results)
    blocks = build_blocks(merged, title)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create report directory {out}: {e.strerror}") from e
    paths: dict[str, Path] = {}
    for b in blocks:  # plots first, so the Markdown never points at a file that is not there yet
        if isinstance(b, Image):
            _write_atomic(out / b.file, b.png)
            paths[b.file.removesuffix(".png")] = out / b.file
    _write_atomic(out / "report.md", render_markdown(blocks))
    _write_atomic(out / "report.html", render_html(blocks, title))
    return {"markdown": out / "report.md", "html": out / "report.html", **paths}
