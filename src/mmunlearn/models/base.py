"""The model-adapter interface: everything family-specific about an MLLM, as data plus a few methods.

Methods and evaluation only ever talk to an adapter: it builds chat prompts and processor inputs, masks labels
to answer tokens (after the processor has expanded image placeholders), names the parameter groups, generates
in batches and saves ordinary ``save_pretrained`` directories.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from mmunlearn.errors import ModelError

IGNORE = -100


@dataclass
class Item:
    """What an adapter encodes: a prompt, an optional answer, an optional image.

    ``text``, when set, is the whole prompt as the model sees it (image placeholder included), used instead of
    the chat template: the hand-built prompts of an official evaluation script (docs/paper_exact.md).
    """

    prompt: str
    answer: str = ""
    image: Image.Image | None = None
    text: str | None = None


class ModelAdapter:
    """Base class; a family sets the class attributes and may override the prompt methods."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # parameter-name prefixes of each group, matched against model.named_parameters()
    group_prefixes: ClassVar[dict[str, tuple[str, ...]]]
    # text placed between the assistant header and the answer, and after the answer
    answer_sep: ClassVar[str] = ""
    # the end-of-turn text that closes an answer (None: the tokenizer's eos) and the tokens generation stops on
    # (empty: the end of turn alone)
    turn_end: ClassVar[str | None] = None
    stop_tokens: ClassVar[tuple[str, ...]] = ()
    # attributes of the *ForConditionalGeneration model: the module returning final hidden states, the LM head
    backbone_attr: ClassVar[str] = "model"
    head_attr: ClassVar[str] = "lm_head"
    # decoder-block classes (activation checkpointing, FSDP wrapping) and the LoRA targets of the papers' recipes
    block_classes: ClassVar[tuple[str, ...]] = ()
    lm_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")
    # set when the vision tower is sharded (FSDP2, ZeRO-3): a batch without images still runs it (on a blank
    # image, contributing zero), so that every rank gathers the same parameters in the same order
    touch_vision: bool = False
    blank_image_side: ClassVar[int | None] = None  # pixels of that blank image (None: the processor's crop size)

    def __init__(self, model: torch.nn.Module, processor, path: str | Path | None = None) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.path = Path(path) if path is not None else None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # rendering a chat template costs more than a tiny model's forward; evaluation repeats prompts a lot
        self.prompt_text = functools.lru_cache(maxsize=65536)(self.prompt_text)  # type: ignore[method-assign]

    @staticmethod
    def load_processor(path: str | Path, **kwargs):
        """The processor of a model directory."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **kwargs)

    # ---- prompts -------------------------------------------------------------------------------------
    def prompt_text(self, prompt: str, has_image: bool) -> str:
        """The chat-formatted prompt, ending where the assistant's answer begins."""
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def item_text(self, item: Item) -> str:
        """The prompt text of an item: its own ``text`` if it has one, else the chat-formatted prompt."""
        return item.text if item.text is not None else self.prompt_text(item.prompt, item.image is not None)

    @property
    def image_placeholder(self) -> str:
        """What stands for an image in a hand-built prompt (the processor expands it)."""
        return getattr(self.processor, "image_token", None) or "<image>"

    @property
    def answer_end(self) -> str:
        """Text that closes an answer in training data (the end-of-turn token)."""
        return self.turn_end or self.tokenizer.eos_token

    # ---- encoding ------------------------------------------------------------------------------------
    def _process(self, texts: list[str], images: list[Image.Image], padding_side: str) -> dict:
        self.tokenizer.padding_side = padding_side
        return self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)

    def encode(self, items: list[Item], with_answer: bool = True) -> dict[str, torch.Tensor]:
        """Processor inputs; with answers, right-padded with ``labels`` on answer tokens only.

        Without answers the batch is left-padded for generation. ``answer_start`` gives, per row, the position
        of the first answer token (after image-token expansion), so losses can find answer spans.
        """
        prompts = [self.item_text(it) for it in items]
        images = [it.image for it in items if it.image is not None]
        if not with_answer:
            return dict(self._process(prompts, images, "left"))
        texts = [self._with_answer(p, it.answer) for p, it in zip(prompts, items)]
        full = dict(self._process(texts, images, "right"))
        plen = self._process(prompts, images, "right")["attention_mask"].sum(1)
        labels = full["input_ids"].clone()
        labels[full["attention_mask"] == 0] = IGNORE
        for i, n in enumerate(plen.tolist()):
            labels[i, :n] = IGNORE
        full["labels"] = labels
        full["answer_start"] = plen
        return full

    def _with_answer(self, prompt_text: str, answer: str) -> str:
        return prompt_text + self.answer_sep + answer + self.answer_end

    def answer_token_ids(self, items: list[Item]) -> list[list[int] | None]:
        """Each answer's token ids (end of turn included) as ``encode`` labels them, from the tokenizer alone.

        Lets a scorer run a prompt once and append its answers to the prompt's KV cache. None where the
        tokenizer merges across the prompt/answer boundary: such an answer is not a continuation of the
        prompt's tokens and needs the joint encoding. Image placeholders stay unexpanded here; they only
        change tokens before the answer.
        """
        prompts = [self.item_text(it) for it in items]
        unique = list(dict.fromkeys(prompts))
        prompt_ids = dict(zip(unique, self.tokenizer(unique)["input_ids"]))
        full_ids = self.tokenizer([self._with_answer(p, it.answer) for p, it in zip(prompts, items)])["input_ids"]
        out: list[list[int] | None] = []
        for p, f in zip(prompts, full_ids):
            n = len(prompt_ids[p])
            out.append(f[n:] if f[:n] == prompt_ids[p] and len(f) > n else None)
        return out

    def position_ids(self, enc: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Rotary positions of a left-padded batch as ``generate`` computes them: (B, T), padding at 0.

        None where a family cannot compute them outside the model (then callers do not reuse a KV cache).
        """
        return (enc["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

    def image_inputs(self, enc: dict[str, torch.Tensor], images: list[int]) -> dict[str, torch.Tensor]:
        """The processor's image inputs for a subset of the batch's images (indices in the batch's order)."""
        if not images:
            return {}
        return {"pixel_values": enc["pixel_values"][images]}

    def prefix_lengths(self, items: list[Item], prefixes: list[str]) -> torch.Tensor:
        """Token length of prompt + the given answer prefixes (for locating a phrase inside an answer).

        A prefix's trailing whitespace is left to the next word (tokenizers attach a space to the word after
        it); an empty prefix gives the answer start.
        """
        prompts = [self.item_text(it)
                   + (self.answer_sep + pre.rstrip() if pre.strip() else "")
                   for it, pre in zip(items, prefixes, strict=True)]
        images = [it.image for it in items if it.image is not None]
        return self._process(prompts, images, "right")["attention_mask"].sum(1)

    def answer_token_spans(
        self, items: list[Item], char_spans: list[tuple[int, int]], batch_size: int = 32
    ) -> list[tuple[int, int]]:
        """Token positions [start, end) in the encoded sequence (image tokens expanded) of the answer
        characters [a, b) of each item: where a phrase inside an answer sits."""
        out: list[tuple[int, int]] = []
        for lo in range(0, len(items), batch_size):
            chunk, spans = items[lo : lo + batch_size], char_spans[lo : lo + batch_size]
            starts = self.prefix_lengths(chunk, [it.answer[:a] for it, (a, _) in zip(chunk, spans, strict=True)])
            ends = self.prefix_lengths(chunk, [it.answer[:b] for it, (_, b) in zip(chunk, spans, strict=True)])
            out += [(int(s), int(e)) for s, e in zip(starts, ends)]
        return out

    # ---- the model's parts ---------------------------------------------------------------------------
    def unwrapped(self) -> torch.nn.Module:
        """The transformers model under any PEFT wrapper (LoRA layers stay injected in it)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def backbone_and_head(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The module that returns the final hidden states (vision tower, projector and LM inside) and the LM
        head, so losses can apply the head at answer positions only."""
        m = self.unwrapped()
        return getattr(m, self.backbone_attr), getattr(m, self.head_attr)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ---- parameters ----------------------------------------------------------------------------------
    def group_of(self, name: str) -> str | None:
        for group, prefixes in self.group_prefixes.items():
            if any(name.startswith(p) for p in prefixes):
                return group
        return None

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names per group ('vision', 'projector', 'language'); every parameter lands in one."""
        groups: dict[str, list[str]] = {g: [] for g in self.group_prefixes}
        for name, _ in self.model.named_parameters():
            g = self.group_of(name)
            if g is None:
                raise ModelError(f"{self.family}: parameter {name!r} belongs to no group; update group_prefixes")
            groups[g].append(name)
        return groups

    def image_features(self, pixel_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Projected image tokens per image, (n_tokens, hidden) each: what the LM sees of an image."""
        out = self.unwrapped().model.get_image_features(**pixel_inputs)
        return list(out.pooler_output)

    def blank_image_inputs(self) -> dict[str, torch.Tensor]:
        """The processor's inputs for one black image of the processor's own size (the vision-tower touch)."""
        crop = getattr(self.processor.image_processor, "crop_size", None) or {}
        side = self.blank_image_side or int(crop.get("height") or 224)
        enc = self._process([self.item_text(Item("", "", Image.new("RGB", (side, side))))],
                            [Image.new("RGB", (side, side))], "right")
        return self.image_inputs(dict(enc), [0])

    @contextlib.contextmanager
    def vision_touched(self) -> Iterator[None]:
        """Within: the input embeddings get ``+ 0 × Σ vision features of a blank image``, so the vision tower
        runs after the embeddings and before the decoder in the forward, and after the decoder in the backward:
        the order in which an image batch uses it (what keeps sharded ranks in step)."""
        emb = self.unwrapped().get_input_embeddings()
        blank = self.blank_image_inputs()

        def hook(_module, _inputs, out):
            dev = out.device
            feats = self.image_features({k: v.to(dev) for k, v in blank.items()})
            return out + 0.0 * sum(f.sum() for f in feats).to(out.dtype)

        handle = emb.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # ---- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, items: list[Item], max_new_tokens: int = 32) -> list[str]:
        """Greedy batched generation; stops once every sequence has ended."""
        enc = self.to_device(self.encode(items, with_answer=False))
        out = self.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_token_ids(),
        )
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def stop_token_ids(self) -> list[int]:
        """The end of turn, or the family's ``stop_tokens`` (those the tokenizer knows)."""
        if not self.stop_tokens:
            return [self.tokenizer.convert_tokens_to_ids(self.answer_end)]
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in self.stop_tokens]
        return [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]

    def to_device(self, batch: dict) -> dict:
        dev = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev)
                if v.is_floating_point():
                    v = v.to(dtype)
            out[k] = v
        return out

    # ---- persistence ---------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """An ordinary transformers directory (safetensors) that ``from_pretrained`` loads."""
        self.model.save_pretrained(out_dir, safe_serialization=True)
        self.processor.save_pretrained(out_dir)
