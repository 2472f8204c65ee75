"""MMUBench fluency and diversity flagged as not informative when the answers they measure are too short."""

import pytest

from mmunlearn.commands import open_model
from mmunlearn.eval.concept import MIN_ANSWER_WORDS, concept_metrics, informative, mean_words

LONG = "She was born in a small harbour town and later worked as a cartographer for the navy."


def test_short_answers_are_not_informative():
    assert mean_words(["Ada Quill.", "It is Bo Tan"]) == 3.0
    assert mean_words(["a-b c"], released=True) == 2.0 and mean_words(["a-b c"]) == 3.0
    out = informative(["Ada Quill.", "It is Bo Tan"], ["Ada Quill.", "Bo Tan."])
    assert out["answer_words"] == 3.0 and out["reference_answer_words"] == 2.0
    assert set(out["not_informative"]) == {"diversity", "fluency_ppl"}
    assert "3.0 words" in out["not_informative"]["diversity"]
    assert "2.0 words" in out["not_informative"]["fluency_ppl"]
    assert f"< {MIN_ANSWER_WORDS}" in out["not_informative"]["diversity"]


def test_long_answers_are_informative():
    assert "not_informative" not in informative([LONG, LONG], [LONG])
    out = informative([LONG], ["Ada Quill."])  # each metric judged on its own texts
    assert list(out["not_informative"]) == ["fluency_ppl"]
    assert list(informative(["Ada."], None)["not_informative"]) == ["diversity"]  # no fluency without a reference


@pytest.fixture(scope="module")
def tiny(small_bench):
    return open_model("tiny", small_bench)


def test_concept_metrics_records_the_flag(tiny, small_bench):
    forget = sorted(small_bench.forget_set("forget15"))
    res = concept_metrics(tiny, small_bench, forget, reference=tiny, batch_size=16, max_new_tokens=4)
    assert res["answer_words"] <= 4 < MIN_ANSWER_WORDS  # 4 new tokens: at most 4 words
    assert "diversity" in res["not_informative"] and 0 <= res["diversity"] <= 100  # the value is kept
    assert f"{res['answer_words']:.1f} words" in res["not_informative"]["diversity"]
    assert "fluency_ppl" in res and "fluency_ppl" in res["not_informative"]


def test_free_form_probes_carry_fluency_and_diversity(tmp_path, monkeypatch):
    """On a benchmark with descriptions, the held-out descriptions join the generality probes (naming rate) and
    fluency and diversity are computed on them alone; membership inference leaves them out."""
    from mmunlearn.data.fictitious import DESCRIBE_VQA, FictitiousConfig, make_fictitious
    from mmunlearn.eval.concept import mia_items, probes

    bench = make_fictitious(tmp_path / "d", FictitiousConfig(num_people=8, train_images=2, test_images=1,
                                                            describe=True))
    forget = sorted(bench.forget_set("forget15"))
    gen = probes(bench, forget)["generality"]
    assert {p.example.qtype for p in gen} == {"identity", "describe"}
    assert all(p.target == bench.entity_names()[p.example.entity] for p in gen)
    members, _ = mia_items(bench, forget)
    assert len(members) == len([e for e in bench.select("forget", forget, purpose="train")
                                if e.kind == "vqa" and e.qtype != "describe"])
    # a model that answers a description in a sentence and anything else with a name: fluency and diversity
    # see the sentences only (on every generality answer they would average fewer words)
    from mmunlearn.eval import concept

    def fake_generate(adapter, items, batch_size, max_new_tokens):
        return [LONG if it.prompt in DESCRIBE_VQA else "Ada Quill." for it in items]

    monkeypatch.setattr(concept, "generate_batched", fake_generate)
    model = open_model("tiny", bench)
    res = concept_metrics(model, bench, forget, reference=model, batch_size=16)
    assert res["answer_words"] == res["reference_answer_words"] == len(LONG[:-1].split())
    assert "not_informative" not in res and res["diversity"] < 100  # "a" is said twice
    assert res["generality_em"] == 100.0  # no answer names anyone
