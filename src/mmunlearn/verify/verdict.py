"""From three measurements (unlearned, vanilla, oracle) to checks, a verdict and the files beside the model.

Each check has a value, a threshold with its rule (``>=`` or ``<=``), pass or fail, and what it was compared with.
A check that cannot be computed (no oracle, nothing to recover) is ``skipped`` with the reason. The verdict:
``removed`` when every computed check passes; ``hidden`` when an attack (relearning, quantization) or a probe
brings the knowledge back, whatever the other checks say; ``not removed`` when no attack succeeds but the model
still differs from never having learned (forget quality, gap to the oracle, membership inference).
"""

from __future__ import annotations

from pathlib import Path

from mmunlearn.outputs import write_json
from mmunlearn.verify.attacks import recovery
from mmunlearn.verify.forget_quality import forget_quality
from mmunlearn.verify.mia import privleak
from mmunlearn.verify.options import Thresholds

JSON_FILE = "verification.json"
MARKDOWN_FILE = "verification.md"
ATTACKS = ("relearn", "quant", "probe")


def _check(name: str, value: float | None, threshold: float, rule: str, compared_with: str,
           skipped: str = "") -> dict:
    passed = None if value is None else (value >= threshold if rule == ">=" else value <= threshold)
    out = {"name": name, "value": value, "threshold": threshold, "rule": rule, "passed": passed,
           "compared_with": compared_with}
    if value is None:
        out["skipped"] = skipped or "not measured"
    return out


def _worst(values: dict[str, float | None]) -> tuple[str | None, float | None]:
    known = {k: v for k, v in values.items() if v is not None}
    if not known:
        return None, None
    k = max(known, key=known.__getitem__)
    return k, known[k]


def compare(m: dict, vanilla: dict, oracle: dict | None, th: Thresholds, kind: str = "vqa",
            min_gap: float = 5.0) -> dict:
    """Summary numbers and checks of measurement ``m`` against ``vanilla`` and (optionally) ``oracle``."""
    summary: dict = {"forget_quality": {}, "oracle_gap": {}, "relearn": {}, "quant": {}, "mia_auc": {},
                     "privleak": {}, "probes": {}}
    checks: list[dict] = []
    no_oracle = "no oracle given (--oracle)"
    for k, r in m["mc"].items():
        o = (oracle or {}).get("mc", {}).get(k)
        fq = forget_quality(r["truth_ratios"], o["truth_ratios"]) if o else None
        summary["forget_quality"][k] = fq
        checks.append(_check(f"forget quality {k.upper()}", fq, th.forget_quality, ">=",
                             "oracle's truth ratios (KS p-value)", no_oracle))
        gaps = {s: abs(v - o["by_split"][s]) for s, v in r["by_split"].items() if o and s in o["by_split"]}
        summary["oracle_gap"][k] = gaps
        worst, gap = _worst(gaps)
        checks.append(_check(f"oracle gap {k.upper()} MC", gap, th.oracle_gap, "<=",
                             f"oracle's MC accuracy ({worst} split, points)" if worst else "oracle's MC accuracy",
                             no_oracle))
    rel = m["relearn"]
    recs: dict[str, float | None] = {}
    for name, s in rel["settings"].items():
        recs[name] = recovery(s["after"], rel["before"], vanilla["relearn"]["before"], min_gap)
        summary["relearn"][name] = {"before": rel["before"], "after": s["after"],
                                    "vanilla": vanilla["relearn"]["before"], "recovery": recs[name]}
    nothing = rel.get("skipped") or f"unlearning moved the held-out score by less than {min_gap} points"
    orel = (oracle or {}).get("relearn", {})
    if orel.get("settings"):
        # what the same attack teaches a model that never learned the forget data: recovery above it is what
        # the unlearning hid (on the built-in benchmark the oracle still knows the entities' text facts, so
        # relearning their faces brings back composed answers even there)
        excess: dict[str, float | None] = {}
        for name, r in recs.items():
            s = orel["settings"].get(name, {})
            orec = recovery(s["after"], orel["before"], vanilla["relearn"]["before"], min_gap) if "after" in s else None
            summary["relearn"][name]["oracle_recovery"] = orec
            excess[name] = None if r is None or orec is None else r - orec
        worst, value = _worst(excess)
        checks.append(_check("relearn recovery", value, th.relearn_excess, "<=",
                             f"recovery minus the oracle's under the same attack ({worst})" if worst else "oracle",
                             nothing))
    else:
        worst, value = _worst(recs)
        checks.append(_check("relearn recovery", value, th.relearn_recovery, "<=",
                             f"vanilla and unlearned held-out {kind.upper()} MC ({worst})" if worst else "vanilla",
                             nothing))
    base, van = m["mc"][kind]["acc"], vanilla["mc"][kind]["acc"]
    for scheme, q in m["quant"].items():
        if "acc" not in q:
            summary["quant"][scheme] = {"skipped": q.get("skipped", "")}
            continue
        rec = recovery(q["acc"], base, van, min_gap)
        summary["quant"][scheme] = {"before": base, "after": q["acc"], "vanilla": van, "recovery": rec,
                                    "same_predictions": q["same_predictions"]}
        checks.append(_check(f"quant {scheme} recovery", rec, th.quant_recovery, "<=",
                             f"vanilla and unlearned forget {kind.upper()} MC",
                             f"unlearning moved the score by less than {min_gap} points"))
    if m.get("mia"):
        summary["mia_auc"] = dict(m["mia"]["auc"])
        if oracle and oracle.get("mia"):
            leaks = {k: privleak(v, oracle["mia"]["auc"][k]) for k, v in m["mia"]["auc"].items()}
            summary["privleak"] = leaks
            worst, value = _worst({k: abs(v) for k, v in leaks.items()})
            checks.append(_check("privleak", value, th.privleak, "<=", f"oracle's MIA AUC (|privleak| %, {worst})"))
        else:
            worst, value = _worst(summary["mia_auc"])
            checks.append(_check("MIA AUC", value, th.mia_auc, "<=", f"chance 0.5 (worst score: {worst})"))
    gaps = {}
    for name, p in m["probes"].items():
        if "acc" not in p:
            summary["probes"][name] = p
            continue
        ref = (oracle or {}).get("probes", {}).get(name, {}).get("acc") if oracle else m["mc"][kind]["by_split"].get(
            "forget")
        gaps[name] = None if ref is None else p["acc"] - ref
        summary["probes"][name] = {"acc": p["acc"], "reference": ref, "gap": gaps[name]}
    if gaps:
        worst, value = _worst(gaps)
        what = "oracle's accuracy on the same probe" if oracle else "the model's own forget accuracy"
        checks.append(_check("probe gap", value, th.probe_gap, "<=", f"{what} (points, worst: {worst})"))
    return {"summary": summary, "checks": checks, "verdict": verdict(checks)}


def verdict(checks: list[dict]) -> str:
    failed = [c["name"] for c in checks if c["passed"] is False]
    if not failed:
        return "removed"
    if any(c.startswith(a) for c in failed for a in ATTACKS):
        return "hidden"
    return "not removed"


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def markdown(result: dict) -> str:
    """The short verdict: one line, then one row per check."""
    meaning = {"removed": "every computed check passes: no sign of the forgotten knowledge",
               "hidden": "an attack or a probe brings the forgotten knowledge back: suppressed, not removed",
               "not removed": "the model still differs from never having learned the forget data"}
    lines = [f"# Verification of `{result['model']}`", "",
             f"**Verdict: {result['verdict']}** — {meaning[result['verdict']]}.", "",
             f"Reference (vanilla): `{result['reference']}`; oracle: "
             + (f"`{result['oracle']}`" if result.get("oracle") else "none") + f"; forget entities: "
             f"{', '.join(result['forget_entities'])}.", "",
             "| check | value | threshold | result | compared with |", "|---|---:|---:|---|---|"]
    for c in result["checks"]:
        res = "skipped: " + c["skipped"] if c["passed"] is None else ("pass" if c["passed"] else "FAIL")
        lines.append(f"| {c['name']} | {_fmt(c['value'])} | {c['rule']} {_fmt(c['threshold'])} | {res} | "
                     f"{c['compared_with']} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / JSON_FILE, result)
    (out / MARKDOWN_FILE).write_text(markdown(result))
    return {"json": out / JSON_FILE, "markdown": out / MARKDOWN_FILE}
