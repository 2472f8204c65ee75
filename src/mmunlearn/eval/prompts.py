"""The official evaluation scripts' prompts and answer parsing, for paper-exact mode (docs/paper_exact.md).

Transcribed from the behaviour of the released scripts (zero-shot):

* MLLMU-Bench as MMUnlearner evaluates it (``MLLMU_eval.py``): options lettered ``A: value``; LLaVA gets a
  hand-built ``USER: <image>\\n...\\nASSISTANT:`` prompt, Qwen-VL the chat template on image questions; text-only
  multiple choice and generation are hand-built for every family; greedy, 50 new tokens; the letter is the first
  character left after deleting everything but ASCII letters and digits.
* CLEAR (``CLEAR_eval.py``): options lettered ``A. value``, the prompt ``{question}\\n{options}\\n`` through the
  chat template, no instruction; same budget and letter parsing.
* MMUBench (SIU's ``evalaccurcy.py``): LLaVA's ``llava_v1`` conversation (system sentence, ``USER: <image>\\n{q}
  ASSISTANT:``), up to 200 tokens; a response "still knows" when the lower-cased target is a raw substring.

Which script a question belongs to follows the benchmark (CLEAR, MMUBench, else MLLMU-Bench, whose task shapes
the built-in benchmark copies); which prompt within a script follows the model family, as the scripts dispatch
on the model id.
"""

from __future__ import annotations

import re
import string

from PIL import Image

from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.models.base import Item, ModelAdapter

MC_SUFFIX = "Just give ONE letter representing the answer directly."
GEN_SUFFIX_VQA = "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH."
GEN_SUFFIX_QA = "Answer the question based on your trained knowledge in one sentence in ENGLISH."
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
NEW_TOKENS = {"mllmu": 50, "clear": 50, "mmubench": 200}  # generation budget of each script
LETTERS = string.ascii_uppercase
HAND_BUILT = ("llava",)  # families the scripts prompt by hand (the rest through the chat template)


def protocol_of(bench: Benchmark) -> str:
    """The official script that evaluates this benchmark: ``clear``, ``mmubench`` or ``mllmu``."""
    if bench.name in ("clear", "mmubench"):
        return bench.name
    return "mllmu"


def lettered(options: list[str], sep: str) -> str:
    """``A{sep} first\\nB{sep} second...``: ``sep`` is ":" for MLLMU-Bench, "." for CLEAR."""
    return "\n".join(f"{LETTERS[i]}{sep} {o}" for i, o in enumerate(options))


def official_letter(text: str) -> str | None:
    """The scripts' answer parsing: delete every character but ASCII letters and digits, take the first one,
    upper-cased (None if nothing is left). "(b) foo" -> "B", "The answer is A" -> "T"."""
    kept = re.sub(r"[^a-zA-Z0-9]", "", text)
    return kept[0].upper() if kept else None


def official_choice(text: str, n_options: int) -> int | None:
    """The option index the scripts read from a response: its ``official_letter`` if it names an option."""
    letter = official_letter(text)
    return LETTERS.index(letter) if letter is not None and letter in LETTERS[:n_options] else None


def official_item(adapter: ModelAdapter, protocol: str, e: Example, image: Image.Image | None) -> Item:
    """The prompt the official script of ``protocol`` gives question ``e`` for this adapter's family."""
    if protocol == "clear":
        return _clear(e, image)
    if protocol == "mmubench":
        return _mmubench(adapter, e, image)
    return _mllmu(adapter, e, image)


def _mllmu(adapter: ModelAdapter, e: Example, image: Image.Image | None) -> Item:
    by_hand = adapter.family in HAND_BUILT
    ph = adapter.image_placeholder
    q = e.prompt
    if e.task == "mc":
        body = f"{q}\n{lettered(e.options or [], ':')}"
        if image is None:  # text-only: hand-built for every family
            return Item(q, "", None, f"USER:\n{body}\n{MC_SUFFIX}\nASSISTANT:")
        if by_hand:
            return Item(q, "", image, f"USER: {ph}\n{body}\n{MC_SUFFIX}\nASSISTANT:")
        return Item(f"\n{body}\n{MC_SUFFIX}", "", image)
    if e.task == "cloze":
        if by_hand:
            head = f"USER: {ph}\n" if image is not None else "USER:\n"
            return Item(q, "", image, f"{head}{q}\nASSISTANT:")
        return Item(f"\n{q}" if image is not None else q, "", image)
    if image is None:  # generation, text-only: hand-built for every family
        return Item(q, "", None, f"USER: {q}\n{GEN_SUFFIX_QA}\nASSISTANT:")
    if by_hand:
        return Item(q, "", image, f"USER: {ph}\n{q}\n{GEN_SUFFIX_VQA}\nASSISTANT: ")
    return Item(f"{q}\n{GEN_SUFFIX_VQA}", "", image)


def _clear(e: Example, image: Image.Image | None) -> Item:
    if e.task == "mc":
        return Item(f"{e.prompt}\n{lettered(e.options or [], '.')}\n", "", image)
    return Item(e.prompt, "", image)


def _mmubench(adapter: ModelAdapter, e: Example, image: Image.Image | None) -> Item:
    if adapter.family not in HAND_BUILT:
        return Item(e.prompt, "", image)
    head = f"{adapter.image_placeholder}\n" if image is not None else ""
    return Item(e.prompt, "", image, f"{LLAVA_V1_SYSTEM} USER: {head}{e.prompt} ASSISTANT:")
