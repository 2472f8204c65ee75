"""Paper-exact mode: each path against a transcription of the official code's behaviour on small inputs
(written here from what the released scripts do), and the default path against our documented corrections.
The official behaviour is quoted in docs/paper_exact.md."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError
from mmunlearn.eval import concept, metrics, prompts
from mmunlearn.eval.runner import EvalConfig, evaluate, mc_prompt
from mmunlearn.methods import saliency as S
from mmunlearn.methods.base import Batches, batch_ce
from mmunlearn.methods.losses import answer_ce, dmk_loss, released_siu_loss
from mmunlearn.methods.mmunlearner import MMUnlearner, MMUnlearnerOptions
from mmunlearn.methods.reference import Reference
from mmunlearn.methods.siu import SIU, released_name_ids, released_phrase_mask
from mmunlearn.models.base import Item
from mmunlearn.models.llava import LlavaAdapter
from mmunlearn.models.qwen2_vl import Qwen2VLAdapter
from mmunlearn.train.unlearn import UnlearnConfig, build_method
from tiny_models import build_llava, build_qwen2_vl

QUESTION = "Where was this person born?"
OPTIONS = ["Paris", "Lisbon", "Lyon", "Rome"]


@pytest.fixture(scope="module")
def llava() -> LlavaAdapter:
    return LlavaAdapter(*build_llava())


@pytest.fixture(scope="module")
def qwen() -> Qwen2VLAdapter:
    return Qwen2VLAdapter(*build_qwen2_vl())


def mc(kind: str = "vqa") -> Example:
    return Example(id=f"q-{kind}", entity="p", kind=kind, task="mc", prompt=QUESTION, answer="Lisbon",
                   split="people", purpose="eval", image="x.png" if kind == "vqa" else None,
                   options=OPTIONS, answer_index=1)


# ---- SIU: the released training_step -------------------------------------------------------------------


def transcribed_released_kl(ref: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, drop: list[int]) -> float:
    """training_step of the released SIU trainer, element by element: p = softmax, times the 0/1 vocabulary
    mask; the first L = mask.shape[1] positions of the logits, unshifted; −Σ p_ref log(p + 1e-12)(1 − mask)
    over (b, i, v), divided by Σ (1 − mask) expanded over the vocabulary."""
    B, L = mask.shape
    V = logits.shape[-1]
    p_ref, p = torch.softmax(ref.double(), -1), torch.softmax(logits.double(), -1)
    total, count = 0.0, 0.0
    for b in range(B):
        for i in range(L):
            for v in range(V):
                m_v = 0.0 if v in drop else 1.0
                keep = 1.0 - float(mask[b, i])
                total += -(float(p_ref[b, i, v]) * m_v) * math.log(float(p[b, i, v]) * m_v + 1e-12) * keep
                count += keep
    return total / count


def test_released_siu_loss_matches_the_transcription_with_excluded_positions() -> None:
    torch.manual_seed(0)
    logits, ref = torch.randn(2, 7, 6), torch.randn(2, 7, 6)  # T = 7 expanded positions
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)  # L = 5 unexpanded
    got = released_siu_loss(ref, logits, mask, vocab_drop=[2, 4])
    assert got.item() == pytest.approx(transcribed_released_kl(ref, logits, mask, [2, 4]), rel=1e-5)
    # the excluded positions matter, and positions past L never count
    assert got.item() != pytest.approx(released_siu_loss(ref, logits, torch.zeros(2, 5), [2, 4]).item(), rel=1e-4)
    changed = logits.clone()
    changed[:, 5:] += 10.0
    assert released_siu_loss(ref, changed, mask, [2, 4]).item() == pytest.approx(got.item(), rel=1e-6)


def test_released_siu_loss_on_an_encoded_batch_whose_target_phrase_excludes_positions(llava) -> None:
    """The whole legacy path on a tiny LLaVA: CE + the released term, with the phrase found by token-id search in
    the unexpanded sequence (the image placeholder counted once) and the name's vocabulary from tokenize()."""
    image = Image.new("RGB", (28, 28), (120, 30, 200))
    phrase = "Alice Moreau"
    ex = [
        Example(id="a", entity="c", kind="vqa", task="gen", prompt="Who is this?", answer=f"This is {phrase}.",
                split="people", purpose="train", image="i.png", target_phrase=phrase),
        Example(id="b", entity="c", kind="qa", task="gen", prompt="What is the capital of France?",
                answer="Paris is the capital of France.", split="people", purpose="train"),
    ]
    batch = llava.encode([Item(e.prompt, e.answer, image if e.image else None) for e in ex])
    mask = released_phrase_mask(llava, batch, ex)
    tok = llava.tokenizer
    phrase_ids = tok(phrase, add_special_tokens=False)["input_ids"]
    # transcription of the released preprocess: the image run collapsed to one token, the phrase searched for
    image_id = llava.model.config.image_token_id
    rows = []
    for ids, att in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        real = [t for t, a in zip(ids, att) if a]
        first = real.index(image_id) if image_id in real else None
        rows.append(real if first is None else real[: first + 1] + [t for t in real[first:] if t != image_id])
    assert mask.shape == (2, max(len(r) for r in rows)) and mask.shape[1] < batch["input_ids"].shape[1]
    starts = [i for i in range(len(rows[0])) if rows[0][i : i + len(phrase_ids)] == phrase_ids]
    assert len(starts) == 1
    assert mask[0].nonzero().flatten().tolist() == list(range(starts[0], starts[0] + len(phrase_ids)))
    assert mask[1].sum() == 0  # no phrase ("none" does not occur)
    drop = released_name_ids(llava, [phrase])
    assert drop == sorted(tok.convert_tokens_to_ids(tok.tokenize(phrase)))

    siu = build_method(UnlearnConfig(method="siu", paper_exact=True))
    assert isinstance(siu, SIU) and siu.opt.legacy_released_code
    siu.vocab_drop = drop
    ref_model = LlavaAdapter(build_llava(seed=3)[0], llava.processor)
    ctx = SimpleNamespace(adapter=llava, reference=Reference("frozen-copy", ref_model))
    loss, _ = siu.loss(ctx, Batches(forget=batch, forget_examples=ex))
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_start")}
        lg, rf = llava.model(**inputs).logits, ref_model.model(**inputs).logits
    expected = answer_ce(lg, batch["labels"]).item() + transcribed_released_kl(rf, lg, mask, drop)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # the default path is the corrected DMK (shifted, answer positions only, no 1/V), a different number
    default = 0.9 * answer_ce(lg, batch["labels"]) + 0.75 * dmk_loss(rf, lg, batch["labels"])
    assert default.item() != pytest.approx(expected, rel=1e-3)


def test_paper_exact_forces_the_official_options_and_rejects_contradictions() -> None:
    assert build_method(UnlearnConfig(method="npo", paper_exact=True)).opt.legacy_mean_ce
    m = build_method(UnlearnConfig(method="mmunlearner", paper_exact=True))
    assert (m.opt.mask_mode, m.opt.preserve, m.opt.fisher_loop, m.opt.groups) == (
        "gradient", "concat", "official", ("language",))
    assert UnlearnConfig(method="mmunlearner", paper_exact=True).resolved().retain_kinds == ("vqa",)
    assert UnlearnConfig(method="mmunlearner", paper_exact=True).resolved().trainable == ("vision", "projector",
                                                                                        "language")
    assert not build_method(UnlearnConfig(method="siu")).opt.legacy_released_code
    with pytest.raises(ConfigError, match="contradicts paper_exact"):
        UnlearnConfig(method="mmunlearner", paper_exact=True, method_options={"mask_mode": "update"})


# ---- MLLMU-Bench, CLEAR and MMUBench prompts -------------------------------------------------------------


def test_mllmu_letter_prompt_llava_is_built_by_hand(llava) -> None:
    image = Image.new("RGB", (28, 28))
    item = prompts.official_item(llava, "mllmu", mc(), image)
    assert llava.item_text(item) == (
        "USER: <image>\nWhere was this person born?\nA: Paris\nB: Lisbon\nC: Lyon\nD: Rome\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:"
    )
    text = prompts.official_item(llava, "mllmu", mc("qa"), None)
    assert llava.item_text(text) == (
        "USER:\nWhere was this person born?\nA: Paris\nB: Lisbon\nC: Lyon\nD: Rome\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:"
    )
    enc = llava.encode([item], with_answer=False)  # the processor expands the hand-written placeholder
    assert (enc["input_ids"] == llava.model.config.image_token_id).sum() > 1


def test_mllmu_letter_prompt_qwen_goes_through_the_chat_template(qwen) -> None:
    image = Image.new("RGB", (56, 56))
    item = prompts.official_item(qwen, "mllmu", mc(), image)
    assert qwen.item_text(item) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\nWhere was this person born?\nA: Paris\nB: Lisbon\nC: Lyon\n"
        "D: Rome\nJust give ONE letter representing the answer directly.<|im_end|>\n<|im_start|>assistant\n"
    )
    # text-only questions: the script's hand-built prompt, for Qwen too
    assert qwen.item_text(prompts.official_item(qwen, "mllmu", mc("qa"), None)).startswith("USER:\nWhere was")


def test_default_prompt_keeps_our_format(llava) -> None:
    assert mc_prompt(mc()) == (f"{QUESTION}\nA. Paris\nB. Lisbon\nC. Lyon\nD. Rome\n"
                               "Just give ONE letter representing the answer directly.")


def test_clear_and_mmubench_prompts(llava) -> None:
    image = Image.new("RGB", (28, 28))
    name = Example(id="n", entity="p", kind="vqa", task="mc", prompt="What is the name of the person in the image?",
                   answer="B", split="people", purpose="eval", image="x.png", options=["A", "B", "C"], answer_index=1)
    item = prompts.official_item(llava, "clear", name, image)
    assert item.text is None and item.prompt == "What is the name of the person in the image?\nA. A\nB. B\nC. C\n"
    em = Example(id="e", entity="p", kind="vqa", task="gen", prompt="Is Trump in this picture?", answer="yes",
                 split="test", purpose="eval", image="x.png", qtype="em")
    assert llava.item_text(prompts.official_item(llava, "mmubench", em, image)) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nIs Trump in this picture? ASSISTANT:"
    )


@pytest.mark.parametrize("text", ["B", " (b) Lisbon", "**C**", "The answer is A", "", "...", "é A", "4"])
def test_official_letter_matches_the_scripts_parsing(text: str) -> None:
    kept = re.sub(r"[^a-zA-Z0-9]", "", text)  # the scripts: strip, first character, upper-cased, must be a key
    want = kept[0].upper() if kept and kept[0].upper() in "ABCD" else None
    got = prompts.official_choice(text, 4)
    assert (None if got is None else "ABCD"[got]) == want


def test_evaluate_paper_exact_scores_by_letters(small_bench, monkeypatch) -> None:
    from mmunlearn.commands import open_model

    monkeypatch.setitem(prompts.NEW_TOKENS, "mllmu", 6)  # the official 50 tokens are slow on CPU
    tiny = open_model("tiny", small_bench)
    cfg = EvalConfig(forget_set="forget15", protocols=("mllmu",), paper_exact=True, limit=17,  # a person's QA
                     splits=("forget", "retain"))
    res = evaluate(tiny, small_bench, cfg, progress=False)
    for split in ("forget", "retain"):
        assert 0 <= res[split]["vqa"]["mc_acc"] <= 100 and "gen_rougeL" in res[split]["qa"]


def test_results_and_run_record_say_which_mode(small_bench, tmp_path, monkeypatch) -> None:
    from mmunlearn.commands import results_markdown, run_evaluate
    from mmunlearn.train.unlearn import unlearn

    monkeypatch.setitem(prompts.NEW_TOKENS, "mllmu", 6)
    cfg = EvalConfig(forget_set="forget15", protocols=(), paper_exact=True, limit=2, splits=("forget",))
    res = run_evaluate(str(small_bench.root), "tiny", cfg, str(tmp_path / "eval.json"), progress=False)
    assert res["mode"] == "paper_exact" and "| model | mode |" in results_markdown({"m": res})
    assert "| paper_exact |" in (tmp_path / "eval.md").read_text()
    adapter = LlavaAdapter(*build_llava())
    log = unlearn(adapter, small_bench, UnlearnConfig(method="ga", forget_set="forget15", steps=1, batch_size=2,
                                                      paper_exact=True), tmp_path / "run", progress=False)
    assert log["mode"] == "paper_exact" and log["config"]["paper_exact"] is True


# ---- MMUBench EM and diversity ---------------------------------------------------------------------------


@pytest.fixture
def em_bench(tmp_path) -> Benchmark:
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    ex = [Example(id=f"em/{i}", entity="c", kind="vqa", task="gen", prompt="Is he in this picture?", answer="yes",
                  split="test", purpose="eval", image="img.png", qtype="em") for i in range(2)]
    return Benchmark("mmubench", tmp_path, ex, {"concept": ["c"]}, {"names": {"c": "Donald Trump"}})


def test_mmubench_em_counts_eyes_as_yes_in_paper_exact_mode_only(em_bench, llava, monkeypatch) -> None:
    monkeypatch.setattr(concept, "generate_batched", lambda a, items, b, n: ["He has blue eyes."] * len(items))
    exact = concept.concept_metrics(llava, em_bench, ["c"], paper_exact=True)
    default = concept.concept_metrics(llava, em_bench, ["c"])
    assert exact["generality_em"] == 0.0  # "yes" found inside "eyes": still recognised
    assert default["generality_em"] == 100.0  # word boundaries: not a "yes"
    assert metrics.contains_raw("Yes, it is", "yes") and not metrics.mentions("eyes", "yes")


def test_released_diversity_splits_on_whitespace() -> None:
    text = "Paris is Paris. paris"
    words = text.split()  # diversity.py: unique / total of split(), case and punctuation kept
    assert metrics.released_diversity(text) == pytest.approx(100 * len(set(words)) / len(words))
    assert metrics.diversity(text) == pytest.approx(100 * 2 / 4)  # default: lower-cased \w+ words
    assert metrics.mean_diversity([text], released=True) == metrics.released_diversity(text)


# ---- MMUnlearner: the official Fisher loop and the mixed preserve set -------------------------------------


def test_official_fisher_loop_matches_the_transcription(llava) -> None:
    image = Image.new("RGB", (28, 28), (10, 200, 40))
    items = [Item("Who is shown here?", "This is Alice Moreau.", image), Item("What is the capital?", "Paris."),
             Item("Describe the picture.", "A portrait.", image), Item("Where was she born?", "Paris, France.")]
    batches = [llava.encode(items[:3]), llava.encode(items[3:])]  # mixed kinds; the last batch is partial
    names = [n for n, _ in llava.model.named_parameters() if llava.group_of(n) == "language"]
    got, n = S.importance(llava, iter(batches), names, official_batches=len(batches))
    # transcription of SFRon.py: train mode, -loss backward, F += grad**2 / len(loader) for every parameter of the
    # module, accumulated in the parameter dtype
    model = llava.model
    model.train()
    want = {k: None for k in names}
    params = dict(model.named_parameters())
    for b in batches:
        model.zero_grad()
        (-batch_ce(llava, b)).backward()
        for k in names:
            if params[k].grad is not None:
                term = params[k].grad.detach() ** 2 / len(batches)
                want[k] = term if want[k] is None else want[k] + term
    model.zero_grad()
    model.eval()
    assert n == 2 and set(got) == set(names)
    for k in names:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-12), k
    # default: fp32, eval mode, the plain mean (equal here: the tiny model has no dropout)
    default, _ = S.importance(llava, iter(batches), names)
    assert all(torch.allclose(default[k], got[k], rtol=1e-5, atol=1e-12) for k in names)


def test_official_preserve_set_is_one_shuffled_mix(small_bench, llava, tmp_path) -> None:
    """preserve=concat scores the language mask on batches drawn from textual QA + retain VQA together (the
    default scores each kind in batches of its own), and the official loop keeps masks for every parameter
    whose name holds proj/fc/linear/mlp/qkv."""
    from mmunlearn.data.batches import ImageCache
    from mmunlearn.methods import Context

    forget = sorted(small_bench.forget_set("forget15"))
    real_encode = llava.encode

    def kinds_seen(paper_exact: bool) -> tuple[list[set[str]], MMUnlearner]:
        seen: list[set[str]] = []

        def spy(items, with_answer=True):
            seen.append({"vqa" if it.image is not None else "qa" for it in items})
            return real_encode(items, with_answer)

        ctx = Context(adapter=llava, bench=small_bench, forget_entities=forget,
                      forget_data=small_bench.select("forget", forget, purpose="train", kind="vqa"), retain_data=[],
                      images=ImageCache(small_bench), batch_size=4, seed=0, out_dir=tmp_path)
        exact = MMUnlearner.paper_exact if paper_exact else {}
        method = MMUnlearner(MMUnlearnerOptions(**{**exact, "importance_batches": 6}))  # fewer batches: quick
        llava.encode = spy
        try:
            method.prepare(ctx)
        finally:
            del llava.encode
        return seen, method

    seen, exact = kinds_seen(True)
    assert {"vqa", "qa"} in seen, "no mixed preserve batch"
    names = [n for n, _ in llava.model.named_parameters() if llava.group_of(n) == "language"]
    assert set(exact.masks) == {n for n in names if S.official_maskable(n)}
    seen, default = kinds_seen(False)
    assert {"vqa", "qa"} not in seen
    assert all(len(m.shape) == 2 for m in default.masks.values())


# ---- GA+KL: the released SIU baseline ran text-only ----------------------------------------------------------


def test_released_ga_kl_is_text_only_and_a_cross_entropy_over_every_position(llava) -> None:
    from mmunlearn.methods.ga_kl import released_text_batch
    from mmunlearn.methods.losses import released_reference_ce

    torch.manual_seed(0)
    logits, ref = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    p_ref, p = torch.softmax(ref, -1), torch.softmax(logits, -1)
    want = -sum(float(p_ref[b, t, v]) * math.log(float(p[b, t, v]) + 1e-12)
                for b in range(2) for t in range(3) for v in range(4)) / 6  # .sum(-1).mean() over (B, T)
    assert released_reference_ce(ref, logits).item() == pytest.approx(want, rel=1e-5)

    image = Image.new("RGB", (28, 28))
    batch = llava.encode([Item("Who is this?", "Alice Moreau.", image), Item("Who is Alice?", "A writer.")])
    text = released_text_batch(llava, batch)
    image_id = llava.model.config.image_token_id
    assert "pixel_values" not in text and not (text["input_ids"] == image_id).any()
    for row in range(2):
        real = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        # input_ids[input_ids < 0] = 0 on the unexpanded sequence: the image run becomes one id-0 token
        if image_id in real:
            k = real.index(image_id)
            real = real[:k] + [0] + [t for t in real[k:] if t != image_id]
        assert text["input_ids"][row][: len(real)].tolist() == real
        answers = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert text["labels"][row][text["labels"][row] != -100].tolist() == answers
    assert build_method(UnlearnConfig(method="ga_kl", paper_exact=True)).opt.legacy_text_only
    assert not build_method(UnlearnConfig(method="ga_kl")).opt.legacy_text_only


def test_released_c_dis_is_the_token_term_of_kl_div() -> None:
    p, q = torch.tensor([[0.2, 1e-14, 0.5]]), torch.tensor([[0.1, 0.3, 0.5]])
    # tokennewdistance.py: clamp to [1e-10, 1], F.kl_div(q.log(), p, reduction="batchmean"), abs
    pc, qc = p.clamp(1e-10, 1), q.clamp(1e-10, 1)
    want = abs(torch.nn.functional.kl_div(qc.log(), pc, reduction="batchmean").item())
    assert metrics.released_token_divergence(p[0].numpy(), q[0].numpy()) == pytest.approx(want, rel=1e-6)
    assert metrics.concept_divergence([0.2, 0.5], [0.1, 0.5]) != pytest.approx(want)  # default: Bernoulli KL


def test_concept_metrics_paper_exact_runs_with_a_reference(small_bench, llava, monkeypatch) -> None:
    monkeypatch.setitem(prompts.NEW_TOKENS, "mmubench", 8)  # the official 200 tokens are slow on CPU
    forget = sorted(small_bench.forget_set("forget15"))
    res = concept.concept_metrics(llava, small_bench, forget, reference=llava, paper_exact=True, limit=1)
    assert res["c_dis"] == pytest.approx(0.0, abs=1e-9)  # the model against itself
    assert {"generality_em", "diversity", "fluency_ppl", "mia_rougeL_recall"} <= set(res)


def test_a_recipe_sets_method_options_under_the_runs_own() -> None:
    from mmunlearn.train.recipes import PAPER

    tiny = UnlearnConfig(method="mmunlearner").resolved()
    assert tiny.method_options["groups"] == ("vision",) and tiny.trainable == ("vision", "projector")
    assert build_method(tiny).opt.groups == ("vision",)
    mine = UnlearnConfig(method="mmunlearner", method_options={"groups": ["vision", "language"], "gamma": 2.0})
    assert build_method(mine.resolved()).opt.groups == ("vision", "language")
    assert mine.resolved().method_options["gamma"] == 2.0
    paper = UnlearnConfig(method="mmunlearner").resolved(PAPER["mmunlearner"])
    assert build_method(paper).opt.groups == ("vision", "language")  # the option's default on real checkpoints
    exact = UnlearnConfig(method="mmunlearner", paper_exact=True).resolved()
    assert "groups" not in exact.method_options and build_method(exact).opt.groups == ("language",)
