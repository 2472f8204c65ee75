import math

import pytest

from mmunlearn.commands import open_model, run_evaluate
from mmunlearn.errors import ConfigError
from mmunlearn.eval.cache import EvalCache
from mmunlearn.eval.concept import concept_metrics, probes
from mmunlearn.eval.runner import EvalConfig, clear_summary, evaluate, mllmu_summary


@pytest.fixture(scope="module")
def tiny(small_bench):
    return open_model("tiny", small_bench)


def test_evaluate_all_units_and_cache(tmp_path, tiny, small_bench):
    cfg = EvalConfig(forget_set="forget15", max_new_tokens=4, protocols=("mllmu", "clear"))
    cache = EvalCache(tmp_path, "model", "data")
    first = evaluate(tiny, small_bench, cfg, progress=False, cache=cache)
    assert cache.hits == 0
    for split in ("forget", "retain", "test", "utility"):
        assert 0 <= first[split]["vqa"]["mc_acc"] <= 100
    assert {"gen_rouge1", "gen_rouge2", "gen_rougeL", "gen_bleu", "name_rate"} <= set(first["forget"]["vqa"])
    assert first["mllmu"]["forget_vqa_mc"] == first["forget"]["vqa"]["mc_acc"]
    assert "forget_name_mc" in first["clear"]
    again = evaluate(tiny, small_bench, cfg, progress=False, cache=EvalCache(tmp_path, "model", "data"))
    assert again == first
    other = EvalCache(tmp_path, "model", "other-data")
    evaluate(tiny, small_bench, cfg, progress=False, cache=other)
    assert other.hits == 0


def test_concept_metrics_on_builtin(tiny, small_bench):
    forget = sorted(small_bench.forget_set("forget15"))
    sets = probes(small_bench, forget)
    assert sets["efficacy"] and sets["generality"] and sets["multilingual"] and sets["multihop"]
    res = concept_metrics(tiny, small_bench, forget, reference=tiny, batch_size=16, max_new_tokens=4)
    for key in ("efficacy_em", "generality_em", "jailbreak_multilingual_asr", "jailbreak_multihop_asr", "diversity"):
        assert 0 <= res[key] <= 100, key
    assert 1 <= res["geval"] <= 5
    assert res["c_dis"] == pytest.approx(0.0, abs=1e-9)  # a model against itself
    assert 0 <= res["mia_rougeL_recall"] <= 1  # random weights may emit no word at all
    assert 0 <= res["mia_auc"] <= 1 and math.isfinite(res["fluency_ppl"])


def test_summaries_from_hand_made_results():
    res = {"forget": {"vqa": {"mc_acc": 30.0, "mc_acc_identity": 25.0, "gen_rougeL": 0.5}, "qa": {"gen_rougeL": 0.9}},
           "real": {"vqa": {"mc_acc": 80.0}}}
    assert mllmu_summary(res) == {"forget_vqa_mc": 30.0, "forget_vqa_rougeL": 0.5, "forget_qa_rougeL": 0.9,
                                  "real_vqa_mc": 80.0}
    assert clear_summary(res) == {"forget_name_mc": 25.0, "forget_vqa_rougeL": 0.5, "forget_textqa_rougeL": 0.9,
                                  "real_vqa_acc": 80.0}


def test_eval_config_errors():
    with pytest.raises(ConfigError, match="unknown protocol"):
        EvalConfig(protocols=("tofu",))
    with pytest.raises(ConfigError, match="mc_mode"):
        EvalConfig(mc_mode="vibes")


def test_run_evaluate_letter_mode(tmp_path, small_bench):
    from mmunlearn.commands import export

    model = open_model("tiny", small_bench)
    export(model, tmp_path / "m")
    res = run_evaluate(str(small_bench.root), str(tmp_path / "m"),
                       EvalConfig(forget_set="forget15", mc_mode="letter", protocols=(), max_new_tokens=2,
                                  splits=("forget",)), progress=False)
    assert 0 <= res["results"]["forget"]["vqa"]["mc_acc"] <= 100


def test_limit_caps_questions_per_unit(tiny, small_bench):
    res = evaluate(tiny, small_bench, EvalConfig(forget_set="forget15", limit=3, protocols=(), max_new_tokens=2),
                   progress=False)
    for split in res.values():
        for r in split.values():
            assert r.get("mc_n", 0) + r.get("gen_n", 0) + r.get("cloze_n", 0) <= 3


def test_fluency_masks_each_answers_own_name_even_after_an_empty_answer(tiny, small_bench):
    from mmunlearn.data.batches import ImageCache
    from mmunlearn.eval.concept import _masked_perplexity

    images = ImageCache(small_bench)
    e = next(e for e in small_bench.examples if e.qtype == "identity" and e.image and e.purpose == "eval")
    name = small_bench.entity_names()[e.entity]
    answer = f"This is {name}, a person."
    alone = _masked_perplexity(tiny, [e], [answer], [name], images)
    unmasked = _masked_perplexity(tiny, [e], [answer], ["Nobody Here"], images)
    after_empty = _masked_perplexity(tiny, [e, e], ["", answer], ["Nobody Here", name], images)
    assert alone != pytest.approx(unmasked), "the name's tokens are left out"
    assert after_empty == pytest.approx(alone)


def test_generation_perplexity_is_that_of_the_reference_answers(tiny, small_bench):
    """gen_ppl = exp(-mean log p) over the answer tokens of the unit's generation questions (by hand here)."""
    from mmunlearn.data.batches import ImageCache
    from mmunlearn.eval.scoring import answer_logprobs
    from mmunlearn.models.base import Item

    cfg = EvalConfig(forget_set="forget15", max_new_tokens=2, protocols=())
    res = evaluate(tiny, small_bench, cfg, progress=False)
    gen = [e for e in small_bench.select("retain", "forget15", purpose="eval", kind="qa") if e.task == "gen"]
    images = ImageCache(small_bench)
    lps = [v for row in answer_logprobs(tiny, [Item(e.prompt, e.answer, images.get(e)) for e in gen]) for v in row]
    assert res["retain"]["qa"]["gen_ppl"] == pytest.approx(math.exp(-sum(lps) / len(lps)), rel=1e-4)
    assert res["retain"]["qa"]["gen_ppl"] > 1


def test_the_evaluation_cache_is_kept_apart_per_dtype(tmp_path, small_bench):
    """A model scored in float32 and then in bfloat16 is scored twice: the cache key holds the dtype."""
    from mmunlearn.commands import run_finetune
    from mmunlearn.train.finetune import FinetuneConfig

    data, model = str(small_bench.root), str(tmp_path / "m")
    run_finetune(data, "tiny", model, FinetuneConfig(steps=2, vision_warmup_steps=0, stop_accuracy=0.0, save_every=0),
                 progress=False)
    cfg = EvalConfig(forget_set="forget15", splits=["forget"], protocols=[], cache_dir=str(tmp_path / "cache"))
    first = run_evaluate(data, model, cfg, progress=False)
    again = run_evaluate(data, model, cfg, progress=False)
    assert first["cached_units"] == 0 < again["cached_units"] and again["results"] == first["results"]
    assert run_evaluate(data, model, cfg, progress=False, dtype="bfloat16")["cached_units"] == 0
