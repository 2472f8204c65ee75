"""Metric functions on hand-made inputs; expected values computed by hand or by the reference libraries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

from mmunlearn.errors import ConfigError, DataError
from mmunlearn.eval import metrics as M

# ----------------------------------------------------------------------------------------------------------
# mentions, EM, ASR


@pytest.mark.parametrize(
    ("text", "names", "expected"),
    [
        ("Yes.", "yes", True),
        ("I see his eyes", "yes", False),
        ("YES, it is", "yes", True),
        ("That is trump's plane", "trump", True),
        ("A trumpet player", "trump", False),
        ("This is Donald\n  Trump", "Donald Trump", True),
        ("This is Donald Duck, not Trump", "Donald Trump", False),
        ("Trump alone", "Donald Trump", False),  # no surname-only match
        ("Trump alone", ["Donald Trump", "Trump"], True),  # unless the variant is given
        ("Captain Jean Luc Picard", "Jean-Luc", True),
        ("This is JK Rowling", "J.K. Rowling", True),
        ("Beyonce sings", "Beyoncé", True),
        ("price is 3.5 dollars", "3.5", True),
        ("price is 3x5 dollars", "3.5", False),  # the name is escaped, '.' is literal
        ("(Dr.) Who?", "Dr.", True),
        ("under_trump", "trump", False),
        ("", "trump", False),
    ],
)
def test_mentions(text: str, names: str | list[str], expected: bool) -> None:
    assert M.mentions(text, names) is expected


def test_name_variants() -> None:
    assert M.name_variants("  Donald   Trump ") == ["Donald Trump"]
    assert M.name_variants("Jean-Luc") == ["Jean-Luc", "Jean Luc"]
    assert M.name_variants("Beyoncé")[0] == "Beyoncé" and "Beyonce" in M.name_variants("Beyoncé")
    with pytest.raises(DataError):
        M.name_variants("   ")
    with pytest.raises(DataError):
        M.mentions("text", [])


def test_generality_em_and_asr() -> None:
    responses = ["This is Donald Trump.", "A man in a suit.", "trump's hat", "A trumpet player"]
    assert M.generality_em(responses, "Trump") == pytest.approx(50.0)
    assert M.attack_success_rate(responses, "Trump") == pytest.approx(50.0)
    assert M.generality_em(responses, "Donald Trump") == pytest.approx(75.0)
    assert M.attack_success_rate(responses, "Donald Trump") == pytest.approx(25.0)
    # the official "yes" check counted "eyes"; word boundaries do not
    assert M.generality_em(["Yes.", "Look at the eyes"], "yes") == pytest.approx(50.0)
    with pytest.raises(DataError):
        M.generality_em([], "Trump")
    with pytest.raises(DataError):
        M.generality_em("one string", "Trump")


# ----------------------------------------------------------------------------------------------------------
# diversity, Min-K%, AUC


def test_diversity() -> None:
    assert M.diversity("the cat and the dog") == pytest.approx(80.0)  # 4 unique / 5 words
    assert M.diversity("Yes yes YES!") == pytest.approx(100.0 / 3)  # lowercase: 1 / 3
    assert M.diversity("one two three") == pytest.approx(100.0)
    assert M.diversity("") == 0.0
    assert M.diversity("?! ...") == 0.0
    assert M.mean_diversity(["the cat and the dog", "a a", ""]) == pytest.approx((80.0 + 50.0 + 0.0) / 3)
    with pytest.raises(DataError):
        M.mean_diversity([])


def test_min_k_percent() -> None:
    lp = [-1.0, -5.0, -2.0, -4.0, -3.0]
    assert M.min_k_percent(lp) == pytest.approx(-4.5)  # k=0.4: ceil(2) lowest = -5, -4
    assert M.min_k_percent(lp, k=0.5) == pytest.approx(-4.0)  # ceil(2.5) = 3: -5, -4, -3
    assert M.min_k_percent(lp, k=1.0) == pytest.approx(-3.0)
    assert M.min_k_percent([-0.7]) == pytest.approx(-0.7)
    assert M.min_k_percent(np.arange(-10.0, 0.0), k=0.7) == pytest.approx(np.mean(np.arange(-10.0, -3.0)))
    with pytest.raises(DataError):
        M.min_k_percent([])
    with pytest.raises(DataError):
        M.min_k_percent([-1.0, float("nan")])
    with pytest.raises(ConfigError):
        M.min_k_percent(lp, k=0.0)


def test_mia_auc() -> None:
    # pairs (member > nonmember): 0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1 -> 3 of 4
    assert M.mia_auc([0.9, 0.4], [0.5, 0.1]) == pytest.approx(0.75)
    assert M.mia_auc([1.0], [1.0]) == pytest.approx(0.5)  # a tie counts half
    assert M.mia_auc([-1.0, -2.0], [-3.0, -4.0]) == pytest.approx(1.0)
    assert M.mia_auc([-3.0, -4.0], [-1.0, -2.0]) == pytest.approx(0.0)
    with pytest.raises(DataError):
        M.mia_auc([], [0.1])


# ----------------------------------------------------------------------------------------------------------
# ROUGE, BLEU


PAIRS = [
    ("the cat sat on the mat", "the cats were sitting on a mat"),
    ("Donald Trump is a businessman.", "He is Donald Trump, a US president and businessman."),
    ("", "reference text"),
    ("completely unrelated words", "nothing in common here"),
]


@pytest.mark.parametrize(("pred", "ref"), PAIRS)
def test_rouge_matches_library(pred: str, ref: str) -> None:
    lib = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
    ours = M.rouge(pred, ref)
    assert set(ours) == {"rouge1", "rouge2", "rougeL"}
    for key in ours:
        assert ours[key] == pytest.approx(lib[key].fmeasure)
    assert M.rouge_l_recall(pred, ref) == pytest.approx(lib["rougeL"].recall)


def test_rouge_by_hand() -> None:
    # LCS("the quick brown fox", "the brown dog and the fox") = the, brown, fox -> 3 of 6 reference tokens
    assert M.rouge_l_recall("the quick brown fox", "the brown dog and the fox") == pytest.approx(0.5)
    # unigram P = 3/3, R = 3/4 -> F1 = 2 * 1 * 0.75 / 1.75
    assert M.rouge("the cat sat", "the cat sat down")["rouge1"] == pytest.approx(1.5 / 1.75)
    # stemming: "cats" ~ "cat", "sitting" ~ "sit"
    assert M.rouge("cats sitting", "cat sit")["rouge1"] == pytest.approx(1.0)


@pytest.mark.parametrize(("pred", "ref"), PAIRS[:2] + PAIRS[3:])
def test_bleu_matches_library(pred: str, ref: str) -> None:
    expected = sentence_bleu(
        [ref.lower().split()], pred.lower().split(), smoothing_function=SmoothingFunction().method1
    )
    assert M.bleu(pred, ref) == pytest.approx(expected)


def test_bleu_edges() -> None:
    assert M.bleu("The Cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert M.bleu("", "the cat") == 0.0
    assert M.bleu("the cat", "") == 0.0
    assert 0.0 < M.bleu("the cat sat", "the cat sat on the mat") < 1.0


def test_generation_scores() -> None:
    preds, refs = ["the cat sat", "a dog"], ["the cat sat", "a bird flew"]
    out = M.generation_scores(preds, refs)
    assert out["rouge1"] == pytest.approx((1.0 + M.rouge("a dog", "a bird flew")["rouge1"]) / 2)
    assert out["bleu"] == pytest.approx((M.bleu(preds[0], refs[0]) + M.bleu(preds[1], refs[1])) / 2)
    with pytest.raises(DataError):
        M.generation_scores(["a"], ["a", "b"])


# ----------------------------------------------------------------------------------------------------------
# multiple choice, cloze


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(B) foo", "B"),
        ("  c.", "C"),
        ("The answer is A", None),  # 'T' is not an option
        ("D", "D"),
        ("", None),
        ("...", None),
        ("1. A", None),  # a digit is alphanumeric and not an option
        ("**a**", "A"),
    ],
)
def test_first_letter(text: str, expected: str | None) -> None:
    assert M.first_letter(text) == expected


def test_first_letter_custom_letters() -> None:
    assert M.first_letter("e) fifth", letters="ABCDE") == "E"
    assert M.first_letter("e) fifth") is None
    with pytest.raises(ConfigError):
        M.first_letter("A", letters="")


def test_mc_accuracy() -> None:
    assert M.mc_accuracy([0, 1, None, 3], [0, 2, 2, 3]) == pytest.approx(50.0)
    assert M.mc_accuracy(["A", "B", None], ["A", "C", "C"]) == pytest.approx(100.0 / 3)
    with pytest.raises(DataError):
        M.mc_accuracy([0], [0, 1])
    with pytest.raises(DataError):
        M.mc_accuracy([], [])


def test_cloze() -> None:
    assert M.cloze_correct("She was born in PARIS, France.", "Paris")
    assert M.cloze_correct("born in paris", " Paris ")
    assert not M.cloze_correct("born in London", "Paris")
    outputs, truths = ["in Paris", "in Rome", "no idea", "Paris"], ["paris", "Rome", "Oslo", "Rome"]
    assert M.cloze_accuracy(outputs, truths) == pytest.approx(50.0)
    with pytest.raises(DataError):
        M.cloze_correct("anything", "  ")


# ----------------------------------------------------------------------------------------------------------
# perplexity, concept divergence


def test_perplexity() -> None:
    lp = np.log([0.5, 0.25, 0.1])
    # kept: 0.5, 0.25 -> exp(-(ln .5 + ln .25) / 2) = exp(ln 8 / 2) = sqrt(8)
    assert M.perplexity(lp, [True, True, False]) == pytest.approx(math.sqrt(8.0))
    assert M.perplexity(lp) == pytest.approx((1 / (0.5 * 0.25 * 0.1)) ** (1 / 3))
    assert M.perplexity(np.log([[0.5, 0.9], [0.5, 0.9]]), [[1, 0], [1, 0]]) == pytest.approx(2.0)
    with pytest.raises(DataError):
        M.perplexity(lp, [False, False, False])
    with pytest.raises(DataError):
        M.perplexity(lp, [True, False])


def test_concept_divergence() -> None:
    assert M.concept_divergence([0.3, 0.9], [0.3, 0.9]) == pytest.approx(0.0, abs=1e-12)
    # KL(Bern(.5) || Bern(.25)) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3); the second position adds 0
    assert M.concept_divergence([0.5, 0.2], [0.25, 0.2]) == pytest.approx(0.5 * math.log(4 / 3) / 2)
    # clipping keeps a vanished probability finite
    assert math.isfinite(M.concept_divergence([0.99], [0.0]))
    assert M.concept_divergence([0.99], [0.0]) > M.concept_divergence([0.99], [0.5])
    with pytest.raises(DataError):
        M.concept_divergence([0.5], [0.5, 0.5])
    with pytest.raises(DataError):
        M.concept_divergence([1.5], [0.5])
