"""Verification: hand-computed truth ratios, forget quality, MIA scores, quantization and recovery; the relearning
split stays apart from what it measures; the checks and the verdict; ``mmunlearn verify`` end to end."""

import json
import math
import zlib

import numpy as np
import pytest
import torch

from mmunlearn.cli import main
from mmunlearn.errors import ConfigError, DataError
from mmunlearn.eval import metrics
from mmunlearn.verify import attacks, verdict
from mmunlearn.verify.forget_quality import forget_quality, truth_ratio
from mmunlearn.verify.mia import privleak, sequence_scores
from mmunlearn.verify.options import Thresholds, VerifyConfig
from mmunlearn.verify.probes import PERTURBATIONS, paraphrased


def test_truth_ratio_by_hand():
    # options: correct (index 1) has summed log-prob -2 over 2 tokens; wrong ones -3/1 and -8/4
    tr = truth_ratio([-3.0, -2.0, -8.0], [1, 2, 4], 1)
    expected = ((math.exp(-3.0) + math.exp(-2.0)) / 2) / math.exp(-1.0)
    assert tr == pytest.approx(expected)
    assert truth_ratio([0.0, 0.0], [1, 1], 0) == pytest.approx(1.0)
    with pytest.raises(DataError):
        truth_ratio([-1.0], [1], 0)
    with pytest.raises(DataError):
        truth_ratio([-1.0, -2.0], [1, 0], 0)


def test_forget_quality_identical_is_one_and_shifted_is_small():
    rng = np.random.default_rng(0)
    a = rng.lognormal(size=50).tolist()
    assert forget_quality(a, list(a)) == pytest.approx(1.0)
    assert forget_quality(a, [x * 100 for x in a]) < 0.05
    with pytest.raises(DataError):
        forget_quality([], a)


def test_mia_scores_by_hand():
    lp = [-0.5, -2.0, -0.1, -4.0, -1.0]
    text = "Lisbon"
    s = sequence_scores({"lp": lp, "mu": [-1.0] * 5, "sigma": [0.5, 1.0, 2.0, 1.0, 0.5]}, text)
    assert s["loss"] == pytest.approx(-7.6 / 5)
    assert s["zlib"] == pytest.approx(-7.6 / len(zlib.compress(b"Lisbon")))
    assert s["min_k_20"] == pytest.approx(-4.0)  # ceil(0.2 * 5) = 1 lowest
    assert s["min_k_40"] == pytest.approx((-4.0 - 2.0) / 2)  # the 2 lowest
    # standardised: (0.5/0.5, -1/1, 0.9/2, -3/1, 0/0.5) = (1, -1, 0.45, -3, 0); lowest 1 of 5
    assert s["min_k_pp_20"] == pytest.approx(-3.0)
    assert metrics.min_k_plus_plus(lp, [-1.0] * 5, [0.5, 1.0, 2.0, 1.0, 0.5], 0.4) == pytest.approx(-2.0)
    assert privleak(0.75, 0.5) == pytest.approx(50.0)
    assert privleak(0.5, 0.5) == 0.0
    assert metrics.mia_auc([s["loss"]], [s["loss"] - 1]) == 1.0
    with pytest.raises(DataError):
        metrics.min_k_plus_plus([-1.0, -2.0], [-1.0], [1.0, 1.0])


def test_recovery_definition():
    assert attacks.recovery(60.0, 20.0, 100.0) == pytest.approx(0.5)
    assert attacks.recovery(20.0, 20.0, 100.0) == 0.0
    assert attacks.recovery(100.0, 0.0, 100.0) == 1.0
    assert attacks.recovery(90.0, 98.0, 100.0) is None  # nothing was removed: no ratio of noise
    assert attacks.recovery(None, 0.0, 100.0) is None


def test_rtn_quantization_by_hand():
    w = torch.tensor([[1.0, -0.6, 0.26, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # 2 bits: levels {-1, 0, 1} x max|w| per group; group size 4 -> one group per row
    assert attacks.rtn_dequantized(w, 2, 4).tolist() == [[1.0, -1.0, 0.0, 0.0], [0.0] * 4]
    # two groups of 2 columns: the second group's max is 0.26
    assert attacks.rtn_dequantized(w, 2, 2)[0].tolist() == pytest.approx([1.0, -1.0, 0.26, 0.0])
    big = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    err8 = (attacks.rtn_dequantized(big, 8) - big).abs()
    err4 = (attacks.rtn_dequantized(big, 4) - big).abs()
    # half a quantization step at most: max|w| of a group / (2 * 127) (resp. / (2 * 7))
    assert err8.max() <= big.abs().max() / 254 + 1e-6
    assert err8.mean() < err4.mean() / 10
    with pytest.raises(ConfigError):
        attacks.rtn_dequantized(big, 1)


def test_quantized_copy_leaves_the_model_and_the_head_alone(small_bench):
    from mmunlearn.commands import open_model

    a = open_model("tiny", small_bench)
    before = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    q = attacks.quantized_copy(a, "int4")
    for n, p in a.model.named_parameters():
        assert torch.equal(p, before[n]), n
    qp = dict(q.model.named_parameters())
    assert torch.equal(qp["lm_head.weight"], before["lm_head.weight"])
    name = next(n for n, _ in attacks.quantizable(a.model))
    assert not torch.equal(qp[name + ".weight"], before[name + ".weight"])
    assert len(torch.unique(qp[name + ".weight"][0, :128])) <= 15  # 4 bits symmetric: at most 15 levels
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        attacks.quantized_copy(a, "fp3")


def test_relearn_split_is_disjoint_from_what_it_measures(small_bench):
    forget = sorted(small_bench.forget_set("forget15"))
    data, measured = attacks.relearn_split(small_bench, forget)
    assert data and measured
    assert {e.qtype for e in data} == {"birthplace", "identity", "occupation"}
    assert {e.qtype for e in measured} == {"hobby", "instrument", "pet"}
    assert not {e.image for e in data} & {e.image for e in measured}
    # measured: the unlearning image (view 0) and the held-out views; relearning: the other training views
    assert {e.image.rsplit("_view", 1)[1] for e in measured if e.split == "people"} == {"0.png"}
    assert {e.entity for e in data} == {e.entity for e in measured} == set(forget)
    assert all(e.purpose == "train" for e in data) and all(e.task == "mc" for e in measured)


def test_probes_change_the_question_or_the_image(small_bench):
    forget = sorted(small_bench.forget_set("forget15"))
    qs = small_bench.select("forget", forget, purpose="eval", kind="vqa", task="mc")
    para = paraphrased(small_bench, qs)
    assert len(para) == len(qs)
    assert all(p.prompt != q.prompt and p.image == q.image and p.options == q.options for p, q in zip(para, qs))
    from mmunlearn.data.batches import ImageCache

    im = ImageCache(small_bench).get(qs[0])
    for name, f in PERTURBATIONS.items():
        out = f(im)
        assert out.size == im.size and np.abs(np.asarray(out, float) - np.asarray(im, float)).mean() > 1, name


def _measurement(acc: float, tr: float, relearn: tuple[float, float], quant: float, auc: float) -> dict:
    return {"mc": {"vqa": {"acc": acc, "n": 4, "truth_ratios": [tr, tr * 1.1, tr * 0.9, tr * 1.2],
                           "by_split": {"forget": acc, "test": acc}}},
            "relearn": {"before": relearn[0], "settings": {"full": {"after": relearn[1]}}},
            "quant": {"int4": {"acc": quant, "n": 4, "same_predictions": 100.0}},
            "mia": {"auc": {"loss": auc}}, "probes": {"crop": {"acc": acc, "n": 4}}}


def test_checks_and_verdicts():
    th = Thresholds()
    vanilla = _measurement(100.0, 0.01, (100.0, 100.0), 100.0, 1.0)
    oracle = _measurement(25.0, 1.0, (25.0, 40.0), 25.0, 0.5)
    # like the oracle, and nothing comes back: removed
    good = verdict.compare(_measurement(25.0, 1.0, (25.0, 30.0), 25.0, 0.52), vanilla, oracle, th)
    assert good["verdict"] == "removed", good["checks"]
    assert good["summary"]["relearn"]["full"]["recovery"] == pytest.approx(5 / 75)
    # looks forgotten, but relearning brings it all back: hidden
    hidden = verdict.compare(_measurement(25.0, 1.0, (25.0, 100.0), 25.0, 0.5), vanilla, oracle, th)
    assert hidden["verdict"] == "hidden"
    assert [c["name"] for c in hidden["checks"] if c["passed"] is False] == ["relearn recovery"]
    # with an oracle, relearning is judged by what it adds over the oracle's recovery (15 / 75 here)
    assert hidden["summary"]["relearn"]["full"]["oracle_recovery"] == pytest.approx(0.2)
    rel = next(c for c in hidden["checks"] if c["name"] == "relearn recovery")
    assert rel["value"] == pytest.approx(0.8) and rel["threshold"] == th.relearn_excess
    # the oracle measured against itself passes by construction, however much relearning teaches it
    assert next(c for c in verdict.compare(oracle, vanilla, oracle, th)["checks"]
                if c["name"] == "relearn recovery")["passed"] is True
    # below chance: far from the oracle, leaks through MIA (privleak -40 %), and not an attack: not removed
    below = verdict.compare(_measurement(0.0, 50.0, (0.0, 0.0), 0.0, 0.3), vanilla, oracle, th)
    failed = {c["name"] for c in below["checks"] if c["passed"] is False}
    assert below["verdict"] == "not removed" and {"forget quality VQA", "oracle gap VQA MC", "privleak"} <= failed
    assert below["summary"]["privleak"]["loss"] == pytest.approx(-40.0)
    # without an oracle the oracle checks are skipped, MIA is judged against chance
    alone = verdict.compare(_measurement(25.0, 1.0, (25.0, 30.0), 25.0, 0.9), vanilla, None, th)
    skipped = {c["name"] for c in alone["checks"] if c["passed"] is None}
    assert skipped == {"forget quality VQA", "oracle gap VQA MC"}
    assert any(c["name"] == "MIA AUC" and c["passed"] is False for c in alone["checks"])
    md = verdict.markdown({"model": "m", "reference": "v", "oracle": None, "forget_entities": ["p1"], **alone})
    assert "**Verdict: not removed**" in md and "| MIA AUC | 0.9 | <= 0.6 | FAIL |" in md


def test_verify_config_errors():
    with pytest.raises(ConfigError, match="quantization scheme"):
        VerifyConfig(quantization=("int1",))
    with pytest.raises(ConfigError, match="unknown probe"):
        VerifyConfig(probes=("shear",))
    with pytest.raises(ConfigError, match="distinct names"):
        VerifyConfig(relearn=[attacks.RelearnSetting("a"), attacks.RelearnSetting("a")])


FAST = ["--quiet", "--set", "steps=2", "--set", "vision_warmup_steps=1", "--set", "batch_size=4"]
CHEAP = ["--set", "relearn=[{name: full, lr: 1e-4, epochs: 0.5}]", "--set", "quantization=[int8]",
         "--set", "mia_limit=8", "--set", "probes=[blur]"]


def test_finetune_exclude_verify_and_unlearn_verify_cli(tmp_path, capsys, small_bench):
    data = str(small_bench.root)
    van, ora, unl = tmp_path / "vanilla", tmp_path / "oracle", tmp_path / "ga"
    assert main(["finetune", "--data", data, "--out", str(van), *FAST]) == 0
    assert main(["finetune", "--data", data, "--out", str(ora), *FAST, "--set", "exclude_forget=forget15",
                 "--set", "exclude_kinds=[vqa]"]) == 0
    rec = json.loads((ora / "mmunlearn_run.json").read_text())
    assert rec["log"]["excluded_entities"] == sorted(small_bench.forget_set("forget15"))
    assert rec["log"]["num_examples"] < json.loads((van / "mmunlearn_run.json").read_text())["log"]["num_examples"]
    capsys.readouterr()
    assert main(["unlearn", "--data", data, "--model", str(van), "--out", str(unl), "--method", "ga", "--quiet",
                 "--set", "forget_set=forget15", "--set", "steps=1"]) == 0
    code = main(["verify", str(unl), "--data", data, "--reference", str(van), "--oracle", str(ora), "--quiet", *CHEAP])
    out = capsys.readouterr().out
    assert code == 0 and "Verdict:" in out
    res = json.loads((unl / verdict.JSON_FILE).read_text())
    assert (unl / verdict.MARKDOWN_FILE).is_file()
    names = [c["name"] for c in res["checks"]]
    for name in ("forget quality VQA", "forget quality QA", "oracle gap VQA MC", "relearn recovery",
                 "quant int8 recovery", "privleak", "probe gap"):
        assert name in names
    for c in res["checks"]:
        assert set(c) >= {"value", "threshold", "rule", "passed", "compared_with"}
    assert res["verdict"] in ("removed", "hidden", "not removed")
    assert res["forget_entities"] == sorted(small_bench.forget_set("forget15"))
    # unlearn --verify writes the same files beside the new model
    unl2 = tmp_path / "po"
    assert main(["unlearn", "--data", data, "--model", str(van), "--out", str(unl2), "--method", "po", "--quiet",
                 "--set", "forget_set=forget15", "--set", "steps=1", "--verify"]) == 0
    assert "verdict:" in capsys.readouterr().out and (unl2 / verdict.JSON_FILE).is_file()
    # errors: one line, exit 2
    assert main(["verify", str(unl), "--data", data, "--reference", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "reference model directory does not exist" in capsys.readouterr().err
    assert main(["verify", str(van), "--data", data, "--reference", str(van), "--quiet"]) == 2
    assert "forget_set" in capsys.readouterr().err
