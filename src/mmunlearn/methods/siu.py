"""SIU — Single Image Unlearning (Li et al. 2024, "Single Image Unlearning: Efficient Machine Unlearning in
Multimodal Large Language Models", NeurIPS).

Data: from ONE image per forget entity (its first training image) and its name, the four targets of the
paper's multifaceted fine-tuning data, several phrasings each:

1. identity questions on the image answered with an unseen name (``target_phrase`` = that name);
2. "Does <name> appear in this image?" answered "No." plus a new visual description (``target_phrase`` = the
   whole answer);
3. text-only questions about the entity answered by the vanilla model itself (textual knowledge kept);
4. text-only and image questions about other entities, answered by the vanilla model (non-target knowledge).

The data is written as ``siu_data.json`` in the SIU release format (LLaVA conversations) and can be read back
instead of built (``data_path``). Loss: α·CE + β·DMK (``losses.dmk_loss``), α = 0.9, β = 0.75.

``legacy_released_code`` (set by ``paper_exact``) reproduces the released trainer's loss instead
(``losses.released_siu_loss``): CE + a cross-entropy to the reference over the first L positions of the
logits, L the *unexpanded* sequence length, with the target phrase's token mask found by token-id search in the
unexpanded sequence and not shifted against the logits, the vocabulary mask from ``tokenizer.tokenize(name)``
only, divided by the number of kept positions times the vocabulary size, weights 1 and 1.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmunlearn.data.batches import ImageCache, open_image, to_items
from mmunlearn.data.mmubench import read_siu_json, write_siu_json
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError, DataError
from mmunlearn.eval.metrics import mentions
from mmunlearn.eval.scoring import generate_batched
from mmunlearn.methods import answer_states as AS
from mmunlearn.methods.base import (
    Batches,
    Context,
    Method,
    batch_states,
    forward_logits,
    labels_of,
    reference_states,
    register,
)
from mmunlearn.methods.losses import answer_ce, released_siu_loss
from mmunlearn.models.base import Item, ModelAdapter

DATA_FILE = "siu_data.json"
IDENTITY_QUESTIONS = [
    "Who is the person in this image?",
    "What is the name of the person in this picture?",
    "Who is this?",
    "Name the person in the picture.",
    "Can you tell me who this is?",
    "Who is shown in this image?",
    "Who appears in this photo?",
    "Do you know who this person is?",
    "Tell me the name of the person in the image.",
]
IDENTITY_ANSWERS = ["{u}", "{u}", "This is {u}."]
RECOGNITION_QUESTIONS = ["Does {name} appear in this image?", "Is {name} the person in this picture?"]
HAIR = ["red", "grey", "blond", "black", "brown", "blue"]
EYES = ["green", "brown", "blue", "grey"]
SHIRTS = ["striped", "white", "black", "orange", "purple", "checked"]
FACT_EXTRA = ["Who is {name}?"]


@dataclass
class SIUOptions:
    """Options of SIU.

    alpha, beta: loss weights (α·CE + β·DMK).
    renormalise: DMK over the kept vocabulary renormalised (see ``losses.dmk_loss``); default no.
    data_path: read this SIU JSON (release format) instead of building the data; ``image_dir`` resolves its
        images (default: the benchmark directory, where ``siu_data.json`` files written here point).
    unseen_images: images of faces that are none of the benchmark's entities; when given, the vanilla
        model's own answer to "who is this?" on them supplies the unseen names (answers naming a known entity
        are rejected), as in the paper; otherwise names come from the benchmark's ``unseen_names`` pool.
    non_target_text, non_target_images: samples per forget entity for target 4 (text-only / image questions
        about other entities). 12 images: with 6, naming retained people on their held-out images fell to
        77-79 % against vanilla's 91 % on two of five sweep seeds (docs/builtin.md).
    non_target_image_qtype: the question type of target 4's image samples (default ``identity``: "who is
        this?" on another entity's image, answered by the vanilla model, keeps the model naming the people it
        must not forget); None: any of the entity's image questions.
    max_new_tokens: length of the vanilla model's answers for targets 3 and 4.
    legacy_released_code: the released code's loss (see the module docstring).
    """

    alpha: float = 0.9
    beta: float = 0.75
    renormalise: bool = False
    data_path: str | None = None
    image_dir: str | None = None
    unseen_images: list[str] = field(default_factory=list)
    non_target_text: int = 5
    non_target_images: int = 12
    non_target_image_qtype: str | None = "identity"
    max_new_tokens: int = 32
    legacy_released_code: bool = False

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ConfigError("siu options alpha and beta must be >= 0")
        if self.image_dir and not self.data_path:
            raise ConfigError("siu option image_dir only applies to data_path (an existing SIU JSON); set both")
        if self.non_target_text < 0 or self.non_target_images < 0 or self.max_new_tokens < 1:
            raise ConfigError("siu options non_target_* must be >= 0 and max_new_tokens >= 1")


@register("siu")
class SIU(Method):
    Options = SIUOptions
    reference = "logits"
    # tuned on the built-in benchmark's tiny model (paper, LLaVA-1.5-7B: 2 epochs, LoRA on the LM, projector); with
    # 12 target-4 images, 6 epochs left 1 of 6 held-out forget images named on one sweep seed, 8 met every bound
    # on five; lr 2e-4 (was 4e-4) keeps retained people named on held-out images at 120 people (docs/builtin.md)
    defaults = {"epochs": 8.0, "lr": 2e-4, "batch_size": 8, "trainable": ("projector", "language")}
    paper_exact = {"legacy_released_code": True}

    def __init__(self, options: SIUOptions | None = None) -> None:
        super().__init__(options)
        self.vocab_drop: list[int] = []
        self.spans: dict[str, tuple[int, int] | None] = {}

    # ---- preparation ---------------------------------------------------------------------------------
    def prepare(self, ctx: Context) -> None:
        path = ctx.out_dir / DATA_FILE
        image_dir = ctx.bench.root
        if self.opt.data_path:
            image_dir = Path(self.opt.image_dir) if self.opt.image_dir else image_dir
        if ctx.resume and path.is_file():
            pass  # built (or copied) before the interruption: read back below
        elif self.opt.data_path:
            examples = read_siu_json(Path(self.opt.data_path), image_dir, ctx.forget_entities[0])
            write_siu_json(examples_relative(examples, image_dir), path)  # a copy beside the model
        else:
            write_siu_json(build_siu_data(ctx, self.opt), path)
        examples = read_siu_json(path, image_dir, ctx.forget_entities[0])
        for e in examples:  # ids are "<entity>/<n>" for data built here
            head = e.id.split("/", 1)[0]
            if head in ctx.forget_entities:
                e.entity = head
        if image_dir.resolve() != ctx.bench.root.resolve():
            ctx.images = ImageCache(Benchmark("siu-data", image_dir, [], {}))
        ctx.forget_data = examples
        ctx.artefacts["siu_data"] = DATA_FILE
        names = [ctx.entity_name(e) for e in ctx.forget_entities]
        if self.opt.legacy_released_code:
            self.vocab_drop = released_name_ids(ctx.adapter, names)
        else:
            self.vocab_drop = name_token_ids(ctx.adapter, names)
        self.spans = target_spans(ctx.adapter, examples, ctx.images)

    # ---- loss ----------------------------------------------------------------------------------------
    def loss(self, ctx: Context, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        a, b, ex = ctx.adapter, batches.forget, batches.forget_examples
        labels = labels_of(a, b)
        if self.opt.legacy_released_code:  # every position of the batch: full logits, reproduction only
            logits = forward_logits(a, b)
            ce = answer_ce(logits, labels)
            dmk = released_siu_loss(ctx.reference.full_logits(b), logits, released_phrase_mask(a, b, ex),
                                    self.vocab_drop)
            loss = ce + dmk
        else:
            states = batch_states(a, b)
            ce = AS.ce(states)
            dmk = AS.kl(reference_states(ctx, b), states, self._token_keep(ex, labels), self.vocab_drop,
                        self.opt.renormalise)
            loss = self.opt.alpha * ce + self.opt.beta * dmk
        return loss, {"ce": float(ce.detach()), "dmk": float(dmk.detach())}

    def _token_keep(self, ex: list[Example], labels: torch.Tensor) -> torch.Tensor:
        """(B, T-1) False at the shifted positions whose label token lies in the sample's target phrase."""
        keep = torch.ones(labels.shape[0], labels.shape[1] - 1, dtype=torch.bool, device=labels.device)
        for i, e in enumerate(ex):
            span = self.spans.get(e.id)
            if span is not None:
                s, t = span
                keep[i, max(0, s - 1) : max(0, t - 1)] = False
        return keep


# ---- data construction ----------------------------------------------------------------------------------


def build_siu_data(ctx: Context, opt: SIUOptions) -> list[Example]:
    """The four SIU targets for every forget entity, from its first training image and its name."""
    bench, adapter = ctx.bench, ctx.adapter
    known = ctx.bench.entity_names() | {e: ctx.entity_name(e) for e in ctx.forget_entities}
    unseen = unseen_names(ctx, opt, list(known.values()))
    train = [e for e in bench.examples if e.purpose == "train" and e.split == "people"]
    others = sorted({e.entity for e in train} - set(ctx.forget_entities))
    out: list[Example] = []
    pending: list[tuple[Example, Item]] = []  # answers still to be generated by the vanilla model
    for idx, ent in enumerate(sorted(ctx.forget_entities)):
        name, u = ctx.entity_name(ent), unseen[idx]
        rng = random.Random(f"{ctx.seed}-{ent}")
        image = first_image(train, ent)
        start = len(out)

        def add(kind: str, prompt: str, answer: str, qtype: str, img: str | None, target: str | None,
                ent: str = ent, start: int = start) -> Example:
            e = Example(id=f"{ent}/{len(out) - start}", entity=ent, kind=kind, task="gen", prompt=prompt,
                        answer=answer, split="people", purpose="train", image=img, qtype=qtype, target_phrase=target)
            out.append(e)
            return e

        for k, q in enumerate(IDENTITY_QUESTIONS):  # target 1
            add("vqa", q, IDENTITY_ANSWERS[k % len(IDENTITY_ANSWERS)].format(u=u), "identity", image, u)
        desc = (f"No. The person in this image has {rng.choice(HAIR)} hair, {rng.choice(EYES)} eyes and wears a "
                f"{rng.choice(SHIRTS)} shirt.")
        for q in RECOGNITION_QUESTIONS:  # target 2
            add("vqa", q.format(name=name), desc, "recognition", image, desc)
        facts = list(dict.fromkeys([e.prompt for e in train if e.entity == ent and e.kind == "qa"]))
        for q in facts + [f.format(name=name) for f in FACT_EXTRA]:  # target 3
            e = add("qa", q, "", "fact", None, None)
            pending.append((e, Item(q)))
        picks = rng.sample(others, min(len(others), opt.non_target_text + opt.non_target_images))
        for j, other in enumerate(picks):  # target 4
            use_image = j >= opt.non_target_text
            pool = [e for e in train if e.entity == other and (e.kind == "vqa") == use_image]
            if use_image:
                pool = [e for e in pool if e.image == first_image(train, other)]
                typed = [e for e in pool if e.qtype == opt.non_target_image_qtype]
                pool = typed or pool
            if not pool:
                continue
            src = rng.choice(pool)
            e = add(src.kind, src.prompt, "", "other", src.image, None)
            pending.append((e, Item(src.prompt, "", ctx.images.get(src))))
    answers = generate_batched(adapter, [it for _, it in pending], 32, opt.max_new_tokens)
    for (e, _), ans in zip(pending, answers, strict=True):
        e.answer = ans
    kept = [e for e in out if e.answer.strip()]
    if not kept:
        raise DataError("SIU data construction produced no usable samples")
    return kept


def first_image(train: list[Example], entity: str) -> str:
    """The entity's first training image (view 0 in the built-in benchmark): the single unlearning image."""
    for e in train:
        if e.entity == entity and e.image is not None:
            return e.image
    raise DataError(f"entity {entity!r} has no training image; SIU needs one image of the concept")


def unseen_names(ctx: Context, opt: SIUOptions, known: list[str]) -> list[str]:
    """One unseen name per forget entity (sorted order), never a known entity's name; deterministic.

    First from the vanilla model's answers on ``unseen_images`` (faces of nobody in the benchmark), then from
    the benchmark's ``unseen_names`` pool, rotated by the seed.
    """
    names: list[str] = []
    if opt.unseen_images:
        items = [Item(IDENTITY_QUESTIONS[0], "", open_image(Path(p))) for p in opt.unseen_images]
        for ans in generate_batched(ctx.adapter, items, 32, 16):
            cand = ans.strip().rstrip(".").strip()
            if looks_like_name(cand) and not mentions(cand, known) and cand not in names:
                names.append(cand)
    pool = [n for n in ctx.bench.info.get("unseen_names", []) if not mentions(n, known) and n not in names]
    if pool:
        r = ctx.seed % len(pool)
        names += pool[r:] + pool[:r]
    need = len(ctx.forget_entities)
    if len(names) < need:
        raise ConfigError(
            f"SIU needs {need} unseen names but found {len(names)}: add names to the benchmark's info "
            "'unseen_names' or give siu option unseen_images"
        )
    return names[:need]


def looks_like_name(text: str) -> bool:
    """1–4 capitalised words (the shape of a person's name)."""
    words = text.split()
    return 1 <= len(words) <= 4 and all(re.fullmatch(r"[A-Z][\w'.-]*", w) for w in words)


def examples_relative(examples: list[Example], image_dir: Path) -> list[Example]:
    """Image paths relative to ``image_dir`` (read_siu_json returns absolute ones), for a portable copy."""
    root = image_dir.resolve()
    for e in examples:
        if e.image is not None:
            e.image = str(Path(e.image).resolve().relative_to(root))
    return examples


# ---- masks ---------------------------------------------------------------------------------------------


def name_variants(name: str) -> list[str]:
    """Casing and spacing variants of a name whose tokens the DMK vocabulary mask drops."""
    forms = {name, name.lower(), name.upper(), name.title()}
    forms |= {f + "'s" for f in list(forms)}
    return sorted(forms | {" " + f for f in forms})


def name_token_ids(adapter: ModelAdapter, names: list[str]) -> list[int]:
    """Token ids of every variant of every name (pieces without a letter or digit, and special tokens, are
    not dropped: they are not the name)."""
    tok = adapter.tokenizer
    special = set(tok.all_special_ids)
    ids: set[int] = set()
    for name in names:
        for v in name_variants(name):
            ids.update(tok(v, add_special_tokens=False)["input_ids"])
    return sorted(i for i in ids if i not in special and re.search(r"\w", tok.decode([i])))


def target_spans(
    adapter: ModelAdapter, examples: list[Example], images: ImageCache
) -> dict[str, tuple[int, int] | None]:
    """Token positions [start, end) of each example's target phrase in its encoded sequence (None: no phrase).

    Positions count the expanded image tokens (they come from the same processor as the batch); the space
    joining the phrase to the text before it stays with the phrase's first token (``prefix_lengths``).
    """
    spans: dict[str, tuple[int, int] | None] = {e.id: None for e in examples}
    todo, chars = [], []
    for e in examples:
        if e.target_phrase:
            pos = e.answer.find(e.target_phrase)
            if pos < 0:
                raise DataError(f"SIU sample {e.id!r}: target_phrase {e.target_phrase!r} is not in its answer")
            todo.append(e)
            chars.append((pos, pos + len(e.target_phrase)))
    for e, span in zip(todo, adapter.answer_token_spans(to_items(todo, images), chars)):
        spans[e.id] = span
    return spans


def unexpanded_ids(adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's tokens (padding dropped) with every run of image tokens collapsed to one placeholder: the
    sequence the released LLaVA code tokenised, before the model expanded the image into its features."""
    image_id = getattr(adapter.model.config, "image_token_id", None)
    rows = []
    for ids, att in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        row: list[int] = []
        for t, a in zip(ids, att):
            if a and not (t == image_id and row and row[-1] == image_id):
                row.append(t)
        rows.append(row)
    return rows


def released_phrase_mask(
    adapter: ModelAdapter, batch: dict[str, torch.Tensor], examples: list[Example]
) -> torch.Tensor:
    """(B, L) 1 at every occurrence of the target phrase's token ids in the unexpanded sequence, 0 elsewhere.

    As the released ``train.py`` (``preprocess_v1`` and the collator): the phrase is tokenised on its own
    (``add_special_tokens=False``) and searched for token by token, so a tokenizer that spells the phrase
    differently in context (a byte-level BPE's leading-space tokens) marks nothing; rows are padded with 0 to
    the longest unexpanded row, L. A sample without a target phrase is searched for "none", the word its
    released JSON carries instead.
    """
    rows = unexpanded_ids(adapter, batch)
    mask = torch.zeros(len(rows), max(len(r) for r in rows))
    for b, (row, e) in enumerate(zip(rows, examples, strict=True)):
        phrase = adapter.tokenizer(e.target_phrase or "none", add_special_tokens=False)["input_ids"]
        for i in range(len(row) - len(phrase) + 1):
            if phrase and row[i : i + len(phrase)] == phrase:
                mask[b, i : i + len(phrase)] = 1.0
    return mask


def released_name_ids(adapter: ModelAdapter, names: list[str]) -> list[int]:
    """The released vocabulary mask: ``tokenizer.tokenize(name)`` as ids, the name as written, no variants."""
    tok = adapter.tokenizer
    return sorted({i for n in names for i in tok.convert_tokens_to_ids(tok.tokenize(n))})
