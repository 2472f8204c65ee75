"""The report: Markdown and HTML with the same tables, PNG plots, merging of evaluate files, errors."""

import html
import json
import math

import pytest
from PIL import Image

from mmunlearn.errors import ConfigError, DataError
from mmunlearn.report import load_results, merge_results, write_report


def split(vqa: float, qa: float, name: float | None = None, samples: list | None = None) -> dict:
    v = {"mc_acc": vqa, "mc_n": 20, "gen_em": 10.0, "gen_rougeL": 0.5}
    if name is not None:
        v["name_rate"] = name
    if samples is not None:
        v["samples"] = samples
    return {"vqa": v, "qa": {"mc_acc": qa, "mc_n": 20, "gen_rougeL": qa / 200}}


def sample(output: str) -> list[dict]:
    return [{"prompt": "Who is this?", "image": "images/p4_view0.png", "answer": "Ada Quill", "output": output}]


def model(name: str, forget: float, retain: float, output: str, **extra) -> dict:
    return {"path": f"runs/{name}", "results": {
        "forget": split(forget, forget - 5, name=forget / 2, samples=sample(output)),
        "retain": split(retain, retain - 2, name=90.0), "test": split(forget + 5, float("nan")),
        "utility": {"vqa": {"mc_acc": 70.0}}, **extra}}


@pytest.fixture
def results() -> dict:
    return {
        "version": 1,
        "benchmark": {"name": "fictitious-people", "path": "/d", "forget_set": "forget10",
                      "forget_entities": ["person004", "person007"]},
        "models": {
            "vanilla": model("vanilla", 80.0, 90.0, "It is Ada Quill.",
                             mmubench={"efficacy_em": 12.5, "diversity": 61.0}),
            "grad_ascent": {**model("ga", 30.0, 60.0, "<script>alert(1)</script>"),
                            "history": [{"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-4} for s in range(6)]},
            "npo": model("npo", 40.0, 85.0, "I do not know.", mmubench={"efficacy_em": 88.0, "diversity": 55.5}),
        },
        "timings_seconds": {"finetune": 150.2, "total": 290.0},
    }


def test_report_files_and_content(tmp_path, results):
    paths = write_report(results, tmp_path / "rep", title="Unlearning report")
    assert set(paths) == {"markdown", "html", "methods_bars", "tradeoff", "curves"}
    md = paths["markdown"].read_text()
    for name in ("vanilla", "grad_ascent", "npo"):
        assert name in md
    for header in ("forget VQA MC ≈oracle", "forget QA MC ↑", "retain VQA MC ↑", "retain QA MC ↑",
                   "test VQA MC ≈oracle", "utility VQA MC ↑", "name forget ≈oracle", "ROUGE-L forget QA ↑",
                   "## Comparison", "## Relative to vanilla",
                   "## Example generations", "## Training curves", "## Timings", "# Unlearning report"):
        assert header in md, header
    assert "test QA" not in md  # NaN for every model: no column
    assert "| vanilla | default | 80.0 | 75.0 | 90.0 | 88.0 | 85.0 | 70.0 | 40.0 | 90.0 | 0.375 |" in md
    assert "0.375" in md  # ROUGE-L of vanilla forget QA: 75 / 200
    # relative to vanilla: grad_ascent forget VQA 30 / 80, QA 25 / 75, retain VQA 60 / 90
    ga_rel = next(line for line in md.split("## Relative to vanilla")[1].splitlines() if line.startswith("| grad"))
    assert ga_rel.startswith("| grad_ascent | 37.5% | 33.3% | 66.7% |")
    assert "## Protocol: MMUBench" in md and "efficacy_em" in md and "88.0" in md
    assert "| grad_ascent | – | – |" in md  # no MMUBench results for that method
    assert "&lt;script&gt;" in md and "<script>" not in md
    assert "![forget vs retain trade-off](tradeoff.png)" in md and "(curves.png)" in md
    assert "| finetune | 150.2 |" in md

    for key in ("methods_bars", "tradeoff", "curves"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200

    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert page.count("data:image/png;base64,") == 3
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "src=\"http" not in page and "<link" not in page  # nothing external
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.endswith(".tmp")]


def test_no_history_no_vanilla_and_missing(tmp_path, results):
    del results["models"]["vanilla"]
    del results["models"]["grad_ascent"]["history"]
    results["models"]["npo"]["results"]["forget"]["vqa"]["mc_acc"] = float("nan")
    paths = write_report(results, tmp_path)
    assert "curves" not in paths and not (tmp_path / "curves.png").exists()
    md = paths["markdown"].read_text()
    assert "Relative to vanilla" not in md and "| npo | default | – |" in md


def test_merge_evaluate_files(tmp_path, results):
    files = []
    for name, m in [("npo", results["models"]["npo"]), ("vanilla", results["models"]["vanilla"])]:
        ev = {"model": f"runs/{name}/", "data": "/data/fictitious", "config": {"forget_set": "forget10"},
              "results": m["results"], "seconds": 3.5}
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(ev))
    merged = merge_results(load_results([str(f) for f in files]))
    assert list(merged["models"]) == ["vanilla", "npo"]  # vanilla first
    assert merged["benchmark"]["forget_set"] == "forget10" and not merged["notes"]
    assert math.isnan(merged["models"]["vanilla"]["results"]["test"]["qa"]["mc_acc"])
    paths = write_report(load_results([str(f) for f in files]), tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "| evaluate npo | 3.50 |" in md and "Relative to vanilla" in md
    # same basename in two places: the parent tells them apart
    same = [{"model": f"runs/{m}/model", "results": {}} for m in ("ga", "npo")]
    assert list(merge_results(same)["models"]) == ["ga/model", "npo/model"]
    # a demo file and an evaluate file on another forget set: merged, with a note in the report
    other = {"model": "runs/siu", "data": "/d", "config": {"forget_set": "forget5"}, "results": {}}
    merged = merge_results([results, other])
    assert list(merged["models"]) == ["vanilla", "grad_ascent", "npo", "siu"]
    assert "forget10" in merged["notes"][0] and "forget5" in merged["notes"][0]
    md = write_report([results, other], tmp_path / "o2")["markdown"].read_text()
    assert "different benchmarks or forget sets" in md


def test_errors(tmp_path):
    with pytest.raises(DataError, match="no models"):
        write_report({"models": {}}, tmp_path / "x")
    with pytest.raises(DataError, match="neither 'models'"):
        write_report([{"something": 1}], tmp_path / "x")
    with pytest.raises(DataError, match="'results' as an object"):
        write_report({"model": "m", "results": [1]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="does not exist: .*nope.json"):
        load_results([str(tmp_path / "nope.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{broken")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_results([str(bad)])
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="bad.json: expected a JSON object"):
        load_results([str(bad)])
    with pytest.raises(ConfigError, match="no results files"):
        load_results([])


def _verification(fq: float, relearn: float | None, q4: float | None, auc: float, leak: float | None) -> dict:
    return {"verdict": "hidden", "checks": [], "summary": {
        "forget_quality": {"vqa": fq, "qa": 0.9}, "oracle_gap": {"vqa": {"forget": 20.0, "test": 10.0}},
        "relearn": {"full": {"recovery": relearn}}, "quant": {"int8": {"recovery": 0.0}, "int4": {"recovery": q4},
                                                              "nf4": {"skipped": "bitsandbytes is not installed"}},
        "mia_auc": {"loss": auc, "min_k_pp_20": auc}, "privleak": {"loss": leak, "min_k_pp_20": leak},
        "probes": {"crop": {"acc": 50.0, "reference": 25.0, "gap": 25.0}}}}


def test_report_verification_section(tmp_path, results):
    results["models"]["oracle"] = {**model("oracle", 25.0, 90.0, "I do not know."),
                                   "verification": _verification(1.0, 0.1, 0.0, 0.5, 0.0)}
    results["models"]["grad_ascent"]["verification"] = _verification(0.001, 0.85, 0.4, 0.3, -40.0)
    paths = write_report(results, tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "## Verification: forgotten or hidden?" in md
    table = md.split("## Verification: forgotten or hidden?")[1]
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for part in ("forget quality VQA", "forget quality QA", "relearn recovery (full)", "quant int8 recovery",
                 "quant int4 recovery", "privleak"):
        assert part in header, part
    assert "nf4" not in header  # skipped everywhere: no column
    assert "| oracle | 1.000 | 0.900 | 20.0 | 0.10 | 0.00 | 0.00 | 0.500 | 0.0 | hidden |" in table
    assert "| grad_ascent | 0.001 | 0.900 | 20.0 | 0.85 | 0.00 | 0.40 | 0.300 | -40.0 | hidden |" in table
    assert "| vanilla |" not in table.split("### Membership")[0]  # no verification: no row
    assert "(recovery.png)" in md and paths["recovery"].is_file()
    assert "crop MC ≈oracle" in md


def _unit(mc: float, mc_n: int, **extra) -> dict:
    return {"mc_acc": mc, "mc_n": mc_n, **extra}


def _bounded(forget_vqa: float, retain_qa: float, retain_qa_n: int, heldout: float | None) -> dict:
    """A model on the splits the bounds read; retain VQA with identity answers on held-out images."""
    retain = _unit(90.0 if forget_vqa > 90 else 88.0, 20, name_rate=95.0, gen_n=40)
    if heldout is not None:
        retain |= {"name_rate_heldout": heldout, "name_heldout_n": 40}
    return {"results": {"forget": {"vqa": _unit(forget_vqa, 400), "qa": _unit(97.0, 400)},
                        "retain": {"vqa": retain, "qa": _unit(retain_qa, retain_qa_n)},
                        "test": {"vqa": _unit(forget_vqa, 400, name_rate=5.0), "qa": _unit(97.0, 400)}}}


@pytest.fixture
def bounded() -> dict:
    return {"models": {"vanilla": _bounded(99.0, 98.0, 5000, 100.0),
                       "mmunlearner": _bounded(50.0, 96.0, 20, 97.5),  # forget VQA 50 > 35: a bound NOT met
                       "siu": _bounded(25.0, 96.0, 5000, None)}}  # no held-out naming measured


def _row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_heldout_retain_naming_column(tmp_path, bounded):
    md = write_report(bounded, tmp_path)["markdown"].read_text()
    table = md.split("## Comparison")[1].split("##")[0]
    header = _row(table, "method")
    i = header.index("name held-out retain ↑")
    assert header[i - 1] == "name retain ↑"
    assert [_row(table, n)[i] for n in ("vanilla", "mmunlearner", "siu")] == ["100.0", "≈97.5", "–"]


def test_noise_marks(tmp_path, bounded):
    md = write_report(bounded, tmp_path)["markdown"].read_text()
    table = md.split("## Comparison")[1].split("## Relative")[0]
    header = _row(table, "method")
    col = {h: i for i, h in enumerate(header)}
    van, mmu, siu = (_row(table, n) for n in ("vanilla", "mmunlearner", "siu"))
    assert "≈" not in "".join(van)  # the reference itself is never marked
    # retain VQA 88 vs 90 on 20 questions each: within the noise
    assert mmu[col["retain VQA MC ↑"]] == "≈88.0" and siu[col["retain VQA MC ↑"]] == "≈88.0"
    # retain QA 96 vs 98: within the noise on 20 questions against 5,000; not on 5,000 against 5,000
    assert mmu[col["retain QA MC ↑"]] == "≈96.0" and siu[col["retain QA MC ↑"]] == "96.0"
    # 50 vs 99 on 400 questions: far outside the noise
    assert mmu[col["forget VQA MC ≈oracle"]] == "50.0"
    assert mmu[col["forget QA MC ↑"]] == "97.0"  # equal to vanilla's: no difference to mark
    assert "two-proportion z-test" in table and "p ≥ 0.05" in table
    rel = md.split("## Relative to vanilla")[1].split("##")[0]
    assert _row(rel, "mmunlearner")[col["retain QA MC ↑"] - 1] == "≈98.0%"
    assert _row(rel, "siu")[col["retain QA MC ↑"] - 1] == "98.0%"
    assert _row(rel, "siu")[col["forget VQA MC ≈oracle"] - 1] == "25.3%"
    assert "≈: within the noise" in rel
    # without a question count there is no claim either way
    del bounded["models"]["mmunlearner"]["results"]["retain"]["vqa"]["mc_n"]
    table = write_report(bounded, tmp_path)["markdown"].read_text().split("## Comparison")[1].split("##")[0]
    assert _row(table, "mmunlearner")[col["retain VQA MC ↑"]] == "88.0"


def test_no_counts_no_marks_no_caption(tmp_path, results):
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert "| npo | default | 40.0 | 35.0 | ≈85.0 | ≈83.0 |" in md  # 85 vs 90 on 20 questions: noise
    for m in results["models"].values():
        for split in ("forget", "retain", "test", "utility"):
            for r in m["results"][split].values():
                r.pop("mc_n", None)
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert "≈" not in md.replace("≈oracle", "") and "two-proportion" not in md


def test_bounds_section(tmp_path, bounded):
    md = write_report(bounded, tmp_path)["markdown"].read_text()
    section = md.split("## Bounds")[1].split("\n## ")[0]
    assert _row(section, "mmunlearner")[1:] == ["forget vqa mc_acc ≤ 35", "50.0", "35.0", "NOT met"]
    assert "| mmunlearner | retain vqa name_rate_heldout ≥ 0.85 × vanilla | 97.5 | 85.0 | met |" in section
    assert "| siu | retain vqa name_rate_heldout ≥ 0.85 × vanilla | – | 85.0 | not measured |" in section
    assert "| siu | test vqa name_rate ≤ 10 | 5.0 | 10.0 | met |" in section
    assert "| vanilla | forget vqa mc_acc ≥ 95 | 99.0 | 95.0 | met |" in section
    assert "| vanilla | retain vqa mc_acc ≥ 95 | 90.0 | 95.0 | NOT met |" in section
    assert "**NOT met**: vanilla, mmunlearner." in section
    # a relative bound without vanilla's value (NaN) cannot be checked
    bounded["models"]["vanilla"]["results"]["retain"]["qa"]["mc_acc"] = float("nan")
    section = write_report(bounded, tmp_path)["markdown"].read_text().split("## Bounds")[1]
    assert "| mmunlearner | retain qa mc_acc ≥ 0.9 × vanilla | 96.0 | – | not measured |" in section
    # a model's recorded method counts as its name does
    bounded["models"]["run7"] = {**bounded["models"].pop("siu"), "method": "siu"}
    assert "| run7 | test vqa name_rate ≤ 10 |" in write_report(bounded, tmp_path)["markdown"].read_text()
    # a method without bounds has no rows; without vanilla there is no section
    models = {"vanilla": bounded["models"]["vanilla"], "npo": bounded["models"]["mmunlearner"]}
    section = write_report({"models": models}, tmp_path)["markdown"].read_text().split("## Bounds")[1]
    assert "| vanilla |" in section and "| npo |" not in section
    models = {k: v for k, v in bounded["models"].items() if k != "vanilla"}
    assert "## Bounds" not in write_report({"models": models}, tmp_path)["markdown"].read_text()


def test_not_informative_metrics(tmp_path, results):
    reason = "the generality answers average 2.0 words (< 8): unique/total words is near 100"
    results["models"]["vanilla"]["results"]["mmubench"] = {
        "efficacy_em": 12.5, "diversity": 100.0, "fluency_ppl": 1.0, "answer_words": 2.0,
        "not_informative": {"diversity": reason, "fluency_ppl": "the original model's answers average 2.0 words"}}
    paths = write_report(results, tmp_path)
    md = paths["markdown"].read_text()
    section = md.split("## Protocol: MMUBench")[1].split("\n## ")[0]
    header = _row(section, "method")
    van, npo = _row(section, "vanilla"), _row(section, "npo")
    assert van[header.index("diversity")] == "n/i" and van[header.index("fluency_ppl")] == "n/i"
    assert npo[header.index("diversity")] == "55.5"  # not flagged: its number
    assert van[header.index("efficacy_em")] == "12.5" and van[header.index("answer_words")] == "2.00"
    assert "not_informative" not in header
    assert f"- **n/i** vanilla, `diversity`: {reason.replace('<', '&lt;')}" in section
    assert "original model's answers average 2.0 words" in section
    assert "not informative on this benchmark" in section
    page = paths["html"].read_text()
    assert '<td class="n">n/i</td>' in page and html.escape(reason) in page
