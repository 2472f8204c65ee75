"""Batched model scoring shared by every protocol: answer log-likelihoods and option ranking."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence

import torch

from mmunlearn import distributed as D
from mmunlearn.data.batches import ImageCache
from mmunlearn.data.schema import Example
from mmunlearn.errors import DataError
from mmunlearn.models.base import IGNORE, Item, ModelAdapter


@functools.cache
def cache_kwarg() -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.24 on (``past_key_values``
    is deprecated there and removed in 5.40), ``past_key_values`` before."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(res):
    """The KV cache a forward returned, under either name."""
    cache = getattr(res, "cache", None)
    return cache if cache is not None else res.past_key_values


def length_batches(items: Sequence[Item], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``items`` in batches of similar length: less padding to compute, and generated batches whose
    answers tend to end together.

    Text-only items and items with an image never share a batch (an image adds hundreds of tokens to a real
    model's prompt); image items are ordered by image size, then by image, then by text length, so questions
    about one image sit together (and can share its prefix, see ``option_logprobs``).
    """
    first_seen: dict[int, int] = {}
    for it in items:
        first_seen.setdefault(id(it.image), len(first_seen))

    def key(i: int) -> tuple[int, int, int, int]:
        it = items[i]
        w, h = it.image.size if it.image is not None else (0, 0)
        return w * h, w, first_seen[id(it.image)], len(it.prompt) + len(it.answer)

    for part in ([i for i, it in enumerate(items) if it.image is None],
                 [i for i, it in enumerate(items) if it.image is not None]):
        order = sorted(part, key=key)
        for lo in range(0, len(order), batch_size):
            yield order[lo : lo + batch_size]


@torch.no_grad()
def generate_batched(adapter: ModelAdapter, items: Sequence[Item], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to every item, in the items' order, through ``ModelAdapter.generate`` in sorted batches."""
    was_training = adapter.model.training
    adapter.model.eval()
    out: list[str] = [""] * len(items)
    done: list[int] = []
    for idx in D.my_batches(length_batches(items, batch_size)):  # all batches on one process
        for i, text in zip(idx, adapter.generate([items[i] for i in idx], max_new_tokens=max_new_tokens)):
            out[i] = text
        done += idx
    adapter.model.train(was_training)
    return D.gather_indexed(out, done)


def token_logprobs(adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of each label token, and the mask of answer positions. Shapes (B, T-1)."""
    batch = adapter.to_device(batch)
    labels = batch.pop("labels")
    batch.pop("answer_start", None)
    logits = adapter.model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


@torch.no_grad()
def answer_logprobs(adapter: ModelAdapter, items: Sequence[Item], batch_size: int = 32) -> list[list[float]]:
    """Log-prob of every answer token (teacher forcing), per item."""
    out: list[list[float]] = [[] for _ in items]
    done: list[int] = []
    for idx in D.my_batches(length_batches(items, batch_size)):
        lp, mask = token_logprobs(adapter, adapter.encode([items[i] for i in idx]))
        for i, row, m in zip(idx, lp.cpu(), mask.cpu()):
            out[i] = row[m].tolist()
        done += idx
    return D.gather_indexed(out, done)


@torch.no_grad()
def option_logprobs(
    adapter: ModelAdapter, prompts: Sequence[Item], options: Sequence[Sequence[str]], batch_size: int = 64
) -> list[list[float]]:
    """Summed log-prob of each option (end of turn included) as the answer to its prompt.

    Each prompt runs once and its KV cache is reused for all of its options, one short answer pass per option
    position, cropped back after each: a 4-option question costs about one prompt pass instead of four, and
    the cache never grows beyond one answer. Questions about the same image also share the image's prefix
    (``_prompt_pass``). Prompts whose answers are not a clean continuation of the prompt's tokens
    (``ModelAdapter.answer_token_ids``) are scored with the joint encoding instead. The scores equal those of
    the joint encoding up to float rounding.
    """
    scores: list[list[float]] = [[0.0] * len(o) for o in options]
    batches = list(enumerate(length_batches(prompts, batch_size)))
    done: list[int] = []
    later: list[tuple[int, int, int]] = []  # (batch, prompt, option) left to the joint encoding
    for b, rows in D.my_batches(batches):  # all batches on one process
        pairs = [(k, j) for k in rows for j in range(len(options[k]))]
        ids = adapter.answer_token_ids([Item(prompts[k].prompt, options[k][j], prompts[k].image) for k, j in pairs])
        answers = {pair: a for pair, a in zip(pairs, ids)}
        shared = [k for k in rows if options[k] and all(answers[k, j] is not None for j in range(len(options[k])))]
        later += [(b, k, j) for k in rows if k not in shared for j in range(len(options[k]))]
        if shared and not _score_shared(adapter, [prompts[k] for k in shared],
                                        [[answers[k, j] for j in range(len(options[k]))] for k in shared],
                                        [scores[k] for k in shared]):
            later += [(b, k, j) for k in shared for j in range(len(options[k]))]
        done += rows
    if D.world() > 1:  # every rank's scores and leftovers, the leftovers in one process's order
        scores = D.gather_indexed(scores, done)
        later = sorted((t for part in D.gather_objects(later) for t in part), key=lambda t: t[0])
    joint = [(k, j) for _, k, j in later]
    items = [Item(prompts[k].prompt, options[k][j], prompts[k].image) for k, j in joint]
    for (k, j), lp in zip(joint, answer_logprobs(adapter, items, batch_size)):
        scores[k][j] = sum(lp)
    return scores


def _score_shared(
    adapter: ModelAdapter, prompts: list[Item], answers: list[list[list[int]]], out: list[list[float]]
) -> bool:
    """Fill ``out`` with summed answer log-probs over one shared prompt pass; False where the family cannot
    give positions outside the model (nothing is filled then)."""
    enc = adapter.encode(prompts, with_answer=False)
    pos = adapter.position_ids(enc)
    if pos is None:
        return False
    enc = adapter.to_device(enc)
    model = adapter.model
    pos = pos.to(enc["input_ids"].device)
    cache, first, attention = _prompt_pass(adapter, prompts, enc, pos)
    nxt = (pos.amax(0) if pos.dim() == 3 else pos).amax(-1) + 1
    pad = adapter.tokenizer.pad_token_id
    for j in range(max(len(a) for a in answers)):
        # the prompt pass scored each answer's first token; the answer pass feeds all but the last token
        seqs = [a[j] if j < len(a) else [pad] for a in answers]
        firsts = torch.tensor([s[0] for s in seqs], device=nxt.device)
        total = first.gather(-1, firsts[:, None]).squeeze(-1)
        width = max(len(s) for s in seqs) - 1
        if width > 0:
            tokens, mask = _pad([torch.tensor(s) for s in seqs], pad, left=False)
            tokens, mask = tokens.to(nxt.device), mask.to(nxt.device)
            cont_pos = nxt[:, None] + torch.arange(width, device=nxt.device)
            if pos.dim() == 3:
                cont_pos = cont_pos.expand(3, -1, -1)
            logits = model(
                input_ids=tokens[:, :-1], attention_mask=torch.cat([attention, mask[:, :-1]], 1),
                position_ids=cont_pos, use_cache=True, **{cache_kwarg(): cache},
            ).logits.float()
            rest = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1) * mask[:, 1:]
            total = total + rest.sum(-1)
            cache.crop(-width)
        for r, a in enumerate(answers):
            if j < len(a):
                out[r][j] = float(total[r])
    return True


def _prompt_pass(adapter: ModelAdapter, prompts: list[Item], enc: dict, pos: torch.Tensor):
    """Run a left-padded prompt batch; returns its KV cache, the log-probs of the next token, and the cache's
    attention mask.

    Questions about the same image share everything up to where their texts differ (the chat header and the
    image's tokens): that prefix runs once per image, its cache is copied to the image's questions, and only
    the rest of each question runs on top. Falls back to one plain pass when nothing is shared or an image's
    tokens would not all be in the shared part.
    """
    mask = enc["attention_mask"].bool()
    real = [enc["input_ids"][r][mask[r]] for r in range(len(prompts))]  # each row's tokens, padding dropped
    plan = _shared_prefixes(adapter, prompts, real)
    if plan is None:
        res = adapter.model(**enc, position_ids=pos, use_cache=True, logits_to_keep=1)
        return output_cache(res), torch.log_softmax(res.logits[:, -1].float(), -1), enc["attention_mask"]
    group_of, prefix_len, leader = plan
    real_pos = [pos[..., r, :][..., mask[r]] for r in range(len(prompts))]
    pad = adapter.tokenizer.pad_token_id
    # 1. one row per group: the shared prefix, with the images it contains
    pre_ids, pre_mask = _pad([real[r][: prefix_len[g]] for g, r in enumerate(leader)], pad)
    pre_pos, _ = _pad([real_pos[r][..., : prefix_len[g]] for g, r in enumerate(leader)], 0)
    image_rows = [r for r, p in enumerate(prompts) if p.image is not None]  # the processor's image order
    images = adapter.image_inputs(enc, [image_rows.index(r) for r in leader if prompts[r].image is not None])
    res = adapter.model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos, **images,
                        use_cache=True, logits_to_keep=1)
    cache = output_cache(res)
    index = torch.tensor(group_of, device=pre_ids.device)
    cache.batch_select_indices(index)
    # 2. every question's own tokens on top of its group's prefix
    suf_ids, suf_mask = _pad([real[r][prefix_len[g] :] for r, g in enumerate(group_of)], pad)
    suf_pos, _ = _pad([real_pos[r][..., prefix_len[g] :] for r, g in enumerate(group_of)], 0)
    attention = torch.cat([pre_mask[index], suf_mask], 1)
    res = adapter.model(input_ids=suf_ids, attention_mask=attention, position_ids=suf_pos, use_cache=True,
                        logits_to_keep=1, **{cache_kwarg(): cache})
    return cache, torch.log_softmax(res.logits[:, -1].float(), -1), attention


def _shared_prefixes(adapter: ModelAdapter, prompts: list[Item], real: list[torch.Tensor]):
    """Per row its group (same image object, or no image), per group the shared prefix length and a leader
    row; None when no group has two rows or an image's tokens reach past its group's prefix. ``real`` holds
    each row's tokens without padding."""
    groups: dict[int, list[int]] = {}
    for r, p in enumerate(prompts):
        groups.setdefault(id(p.image), []).append(r)
    if all(len(rows) < 2 for rows in groups.values()):
        return None
    image_id = getattr(adapter.model.config, "image_token_id", None)
    group_of = [0] * len(prompts)
    prefix_len, leader = [], []
    for g, rows in enumerate(groups.values()):
        seqs = [real[r] for r in rows]
        n = min(len(s) for s in seqs) - 1  # every row keeps at least its last token for the second pass
        for s in seqs[1:]:
            differ = (s[:n] != seqs[0][:n]).nonzero()
            n = int(differ[0]) if len(differ) else n
        for s in seqs:
            if image_id is not None and (s[n:] == image_id).any():
                return None
        for r in rows:
            group_of[r] = g
        prefix_len.append(n)
        leader.append(rows[0])
    if min(prefix_len) < 1:
        return None
    return group_of, prefix_len, leader


def _pad(seqs: list[torch.Tensor], value: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D (or (3, n) position) tensors along a batch dimension, padded on the left or right, with the mask."""
    width = max(s.shape[-1] for s in seqs)
    lead = seqs[0].shape[:-1]
    out = seqs[0].new_full((*lead, len(seqs), width) if lead else (len(seqs), width), value)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        n = s.shape[-1]
        sl = slice(width - n, width) if left else slice(0, n)
        out[..., i, sl] = s
        mask[i, sl] = 1
    return out, mask


@torch.no_grad()
def rank_options(
    adapter: ModelAdapter, examples: Sequence[Example], images: ImageCache, batch_size: int = 64
) -> list[int]:
    """Multiple choice by log-likelihood: the option whose text has the highest summed log-prob as the answer."""
    empty = [e.id for e in examples if not e.options]
    if empty:
        raise DataError(f"multiple-choice example {empty[0]!r} has no options")
    prompts = [Item(e.prompt, "", images.get(e)) for e in examples]
    scores = option_logprobs(adapter, prompts, [e.options or [] for e in examples], batch_size)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]
