"""The report's verification section: one row per model (the oracle included), and a plot of attack recovery.

Reads ``models[name]["verification"]`` (``verdict.compare``'s output, layout in docs/results.md).
"""

from __future__ import annotations

from typing import Any

from mmunlearn.report import MISSING, Block, Bullets, Heading, Image, Para, Table, _colours, _num, _png

PRIMARY_MIA = "min_k_pp_20"


def _f(v: Any, digits: int = 2) -> str:
    x = _num(v)
    return MISSING if x is None else f"{x:.{digits}f}"


def _columns(models: dict[str, dict]) -> tuple[list[str], list[str]]:
    relearn: list[str] = []
    quant: list[str] = []
    for m in models.values():
        s = (m.get("verification") or {}).get("summary", {})
        relearn += [k for k in s.get("relearn", {}) if k not in relearn]
        quant += [k for k, q in s.get("quant", {}).items() if "recovery" in q and k not in quant]
    return relearn, quant


def verification_table(models: dict[str, dict]) -> Table:
    relearn, quant = _columns(models)
    header = ["method", "forget quality VQA ↑", "forget quality QA ↑", "oracle gap forget VQA MC ↓",
              *[f"relearn recovery ({k}) ↓" for k in relearn], *[f"quant {k} recovery ↓" for k in quant],
              "MIA AUC (Min-K%++) ≈oracle", "privleak (Min-K%++) ≈0", "verdict"]
    rows = []
    for name, m in models.items():
        v = m.get("verification")
        if not isinstance(v, dict):
            continue
        s = v.get("summary", {})
        fq = s.get("forget_quality", {})
        gap = s.get("oracle_gap", {}).get("vqa", {})
        rows.append([
            name, _f(fq.get("vqa"), 3), _f(fq.get("qa"), 3), _f(gap.get("forget"), 1),
            *[_f(s.get("relearn", {}).get(k, {}).get("recovery")) for k in relearn],
            *[_f(s.get("quant", {}).get(k, {}).get("recovery")) for k in quant],
            _f(s.get("mia_auc", {}).get(PRIMARY_MIA), 3), _f(s.get("privleak", {}).get(PRIMARY_MIA), 1),
            str(v.get("verdict", MISSING)),
        ])
    return Table(header, rows)


def mia_table(models: dict[str, dict]) -> Table | None:
    keys: list[str] = []
    for m in models.values():
        keys += [k for k in ((m.get("verification") or {}).get("summary", {}).get("mia_auc") or {}) if k not in keys]
    if not keys:
        return None
    rows = []
    for name, m in models.items():
        s = (m.get("verification") or {}).get("summary")
        if s:
            rows.append([name] + [f"{_f(s['mia_auc'].get(k), 3)} / {_f(s.get('privleak', {}).get(k), 1)}"
                                  for k in keys])
    return Table(["method"] + [f"{k} AUC / privleak" for k in keys], rows)


def probe_table(models: dict[str, dict]) -> Table | None:
    keys: list[str] = []
    for m in models.values():
        p = (m.get("verification") or {}).get("summary", {}).get("probes") or {}
        keys += [k for k, v in p.items() if isinstance(v, dict) and "acc" in v and k not in keys]
    if not keys:
        return None
    rows = []
    for name, m in models.items():
        p = (m.get("verification") or {}).get("summary", {}).get("probes")
        if p is not None:
            rows.append([name] + [_f(p.get(k, {}).get("acc"), 1) for k in keys])
    return Table(["method"] + [f"{k} MC ≈oracle" for k in keys], rows)


def plot_recovery(models: dict[str, dict]) -> bytes | None:
    """Grouped bars: per method, the recovery of each attack (0 = nothing back, 1 = all back)."""
    from matplotlib.figure import Figure

    relearn, quant = _columns(models)
    attacks = [("relearn", k, f"relearn ({k})") for k in relearn] + [("quant", k, f"quant {k}") for k in quant]
    names = [n for n, m in models.items() if (m.get("verification") or {}).get("summary")]
    if not attacks or not names:
        return None
    colours = _colours(["vanilla", *[a[2] for a in attacks]])
    fig = Figure(figsize=(max(7.0, 0.9 * len(names) + 3), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / len(attacks)
    for j, (group, key, label) in enumerate(attacks):
        xs, ys = [], []
        for i, n in enumerate(names):
            r = _num(models[n]["verification"]["summary"].get(group, {}).get(key, {}).get("recovery"))
            if r is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(r)
        ax.bar(xs, ys, width, label=label, color=colours[label])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(1, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("recovery  (0 = nothing back, 1 = all back)")
    ax.set_title("Attack recovery per method (missing bar: nothing to recover)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def verification_blocks(models: dict[str, dict]) -> list[Block]:
    if not any(isinstance(m.get("verification"), dict) for m in models.values()):
        return []
    blocks: list[Block] = [
        Heading(2, "Verification: forgotten or hidden?"),
        Bullets([
            [("forget quality", "bold"), ": KS-test p-value between the model's and the oracle's truth ratios on "
             "the forget entities' MC questions (1 = indistinguishable from never having learned; < 0.05 = "
             "different)."],
            [("oracle gap", "bold"), ": |forget VQA MC accuracy − the oracle's|, points."],
            [("relearn / quant recovery", "bold"), ": (score after the attack − unlearned) / (vanilla − unlearned) "
             "on held-out forget VQA questions: 0 = nothing came back, 1 = everything; ", MISSING,
             " = the model scores like vanilla, nothing to recover. High recovery = the knowledge was hidden, "
             "not removed."],
            [("MIA AUC / privleak", "bold"), ": membership inference on the forget training answers vs never-seen "
             "answers; privleak = (AUC − AUC_oracle) / AUC_oracle × 100, 0 is ideal."],
        ]),
        verification_table(models),
    ]
    png = plot_recovery(models)
    if png is not None:
        blocks.append(Image("recovery.png", "attack recovery per method", png))
    for title, table in (("Membership inference (all scores)", mia_table(models)),
                         ("Probes: paraphrased questions and perturbed images (forget VQA MC %)", probe_table(models))):
        if table is not None:
            blocks += [Heading(3, title), table]
    notes = sorted({m["verification"].get("note", "") for m in models.values()
                    if isinstance(m.get("verification"), dict)} - {""})
    blocks += [Para([n]) for n in notes]
    return blocks
