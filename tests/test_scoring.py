"""The batched scoring path every protocol shares: option likelihoods over a reused prompt KV cache, sorted
batches, and multiple choice by first letter.

Every fast path is checked against the plain one it replaces (joint prompt+answer encoding, one item at a
time), on tiny instances of each model family and on the built-in tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmunlearn.commands import open_model
from mmunlearn.data.batches import ImageCache
from mmunlearn.eval.runner import EvalConfig, score_mc
from mmunlearn.eval.scoring import answer_logprobs, generate_batched, length_batches, option_logprobs, rank_options
from mmunlearn.models.base import IGNORE, Item, ModelAdapter
from mmunlearn.models.llava import LlavaAdapter
from mmunlearn.models.qwen2_vl import Qwen2VLAdapter
from tiny_models import BUILDERS

ADAPTERS = {"llava": LlavaAdapter, "qwen2-vl": Qwen2VLAdapter, "qwen2.5-vl": Qwen2VLAdapter}


def picture(width: int = 56, height: int = 56, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


FACE = picture()
# images of different sizes (Qwen: different token counts), three questions about one image (they share its
# prefix), text-only prompts, 2 to 4 options of 1 to 20 tokens
PROMPTS = [
    Item("Who is this?", image=FACE),
    Item("What is the capital of France?"),
    Item("Where was she born?", image=picture(84, 56, seed=1)),
    Item("Where was the person in this picture born?", image=FACE),
    Item("Describe the picture.", image=picture(seed=2)),
    Item("Tell me more about this person."),
    Item("Who is this?", image=FACE),
]
OPTIONS = [
    ["Alice Moreau", "Paris", "a painter and a teacher of art", "no"],
    ["Paris", "Lyon", "Lisbon"],
    ["yes", "She was born in Paris, France, and works as a marine biologist.", "x", "The quick brown fox"],
    ["Lyon", "Paris"],
    ["A portrait", "0123"],
    ["", "He was born in Lisbon."],
    ["Alice", "Bob", "Alice Moreau"],
]


@pytest.fixture(scope="module", params=[*BUILDERS, "tiny"])
def adapter(request, small_bench) -> ModelAdapter:
    if request.param == "tiny":
        return open_model("tiny", small_bench)
    torch.manual_seed(0)
    model, processor = BUILDERS[request.param]()
    return ADAPTERS[request.param](model, processor)


def joint_scores(adapter: ModelAdapter) -> list[list[float]]:
    """The plain way: every prompt+option pair encoded and run on its own."""
    return [[sum(answer_logprobs(adapter, [Item(p.prompt, o, p.image)])[0]) for o in opts]
            for p, opts in zip(PROMPTS, OPTIONS)]


def assert_close(a: list[list[float]], b: list[list[float]]) -> None:
    assert [len(r) for r in a] == [len(r) for r in b]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-4, abs=1e-3)


def test_answer_token_ids_are_the_labels_of_the_joint_encoding(adapter):
    items = [Item(p.prompt, o, p.image) for p, opts in zip(PROMPTS, OPTIONS) for o in opts]
    ids = adapter.answer_token_ids(items)
    for item, answer in zip(items, ids):
        enc = adapter.encode([item])
        assert answer == enc["labels"][0][enc["labels"][0] != IGNORE].tolist()


def test_shared_prompt_cache_gives_the_joint_scores(adapter):
    adapter.model.eval()
    expected = joint_scores(adapter)
    for batch_size in (1, 2, 64):
        assert_close(option_logprobs(adapter, PROMPTS, OPTIONS, batch_size), expected)


def test_answers_that_do_not_continue_the_prompt_fall_back_to_the_joint_encoding(adapter, monkeypatch):
    expected = joint_scores(adapter)
    real = adapter.answer_token_ids
    calls = {"n": 0}

    def some_unshareable(items):
        calls["n"] += 1
        return [None if i % 3 == 0 else ids for i, ids in enumerate(real(items))]

    monkeypatch.setattr(adapter, "answer_token_ids", some_unshareable)
    assert_close(option_logprobs(adapter, PROMPTS, OPTIONS, 2), expected)
    assert calls["n"] > 0
    monkeypatch.setattr(adapter, "position_ids", lambda enc: None)  # a family without outside positions
    assert_close(option_logprobs(adapter, PROMPTS, OPTIONS, 2), expected)


def test_sorted_batches_cover_every_item_once():
    items = [Item("q" * n, image=picture(8 * (1 + n % 3), 8)) if n % 2 else Item("q" * n) for n in range(23)]
    batches = list(length_batches(items, 5))
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert all(0 < len(b) <= 5 for b in batches)
    # text rows never pad up to an image row; images by size, so rows of one size sit together
    assert all(len({items[i].image is None for i in b}) == 1 for b in batches)
    sizes = [items[i].image.size if items[i].image else (0, 0) for b in batches for i in b]
    assert sizes == sorted(sizes, key=lambda s: (s[0] * s[1], s[0]))


def test_generate_batched_keeps_the_items_order(adapter):
    items = [Item(p.prompt, "", p.image) for p in PROMPTS]
    assert generate_batched(adapter, items, 2, 3) == [adapter.generate([it], max_new_tokens=3)[0] for it in items]


def test_rank_options_on_the_benchmark_matches_joint_scoring(small_bench):
    tiny = open_model("tiny", small_bench)
    mc = [e for e in small_bench.examples if e.task == "mc"][:12]
    images = ImageCache(small_bench)
    expected = []
    for e in mc:
        scores = [sum(answer_logprobs(tiny, [Item(e.prompt, o, images.get(e))])[0]) for o in e.options]
        expected.append(int(np.argmax(scores)))
    assert rank_options(tiny, mc, images, batch_size=5) == expected


def test_letter_mode_reads_one_token_and_retries_rows_without_a_letter(small_bench, monkeypatch):
    tiny = open_model("tiny", small_bench)
    mc = [e for e in small_bench.examples if e.task == "mc"][:6]
    asked: list[tuple[int, int]] = []

    def fake_generate(items, max_new_tokens=32):
        asked.append((len(items), max_new_tokens))
        if max_new_tokens == 1:  # first token: a letter for most rows, punctuation for "Who ..." prompts
            return ["(" if it.prompt.startswith("Who") else "c" for it in items]
        return ["(B) " for _ in items]

    monkeypatch.setattr(tiny, "generate", fake_generate)
    pred = score_mc(tiny, mc, ImageCache(small_bench), EvalConfig(mc_mode="letter", batch_size=4))
    who = [e.prompt.startswith("Who") for e in mc]
    assert any(who) and not all(who)
    assert pred == [1 if w else 2 for w in who]
    assert all(n == 1 for _, n in asked[:2]) and asked[-1][1] > 1


def test_questions_about_one_image_share_its_prefix(adapter):
    from mmunlearn.eval.scoring import _shared_prefixes

    def unpadded(prompts: list[Item]) -> list[torch.Tensor]:
        enc = adapter.encode(prompts, with_answer=False)
        return [ids[m.bool()] for ids, m in zip(enc["input_ids"], enc["attention_mask"])]

    real = unpadded(PROMPTS)
    group_of, prefix_len, leader = _shared_prefixes(adapter, PROMPTS, real)
    face_rows = [r for r, p in enumerate(PROMPTS) if p.image is FACE]
    assert len({group_of[r] for r in face_rows}) == 1 and group_of.count(group_of[face_rows[0]]) == 3
    n = prefix_len[group_of[face_rows[0]]]
    ids = real[face_rows[0]]
    image_id = adapter.model.config.image_token_id
    assert (ids[:n] == image_id).sum() == (ids == image_id).sum() > 1, "the shared prefix holds the whole image"
    assert len(prefix_len) == len(set(group_of)) == len(leader) == 4  # FACE, text-only, and two single images
    distinct = [Item("Who is this?", image=picture(seed=s)) for s in range(3)]
    assert _shared_prefixes(adapter, distinct, unpadded(distinct)) is None
