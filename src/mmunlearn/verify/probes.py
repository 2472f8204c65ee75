"""Probes: the forget entities' questions asked differently. Unlearning that only suppressed the benchmark's own
prompts and images answers again when the question is paraphrased or the image slightly changed.

* ``paraphrase``: each forget question (on its own image) with another phrasing of the same question type, taken
  from the benchmark's other questions about that entity;
* ``crop``, ``color``, ``blur``, ``rotate``: the forget questions with the image centre-cropped to 80 % (and
  resized back), colour-jittered (brightness x1.25, contrast x0.8, saturation x1.3), Gaussian-blurred (radius 1
  per 64 pixels) or rotated by 15 degrees;
* translated identity prompts (``eval.concept.TRANSLATIONS``) only where the model knows those languages (the
  tiny built-in model was trained on English only, so the demo leaves them out).

Each probe's score is multiple-choice accuracy in %; closer to the oracle's is better.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from PIL import Image, ImageEnhance, ImageFilter

from mmunlearn.data.batches import ImageCache
from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import ConfigError
from mmunlearn.eval import metrics
from mmunlearn.eval.concept import TRANSLATIONS
from mmunlearn.eval.scoring import generate_batched, rank_options
from mmunlearn.models.base import Item, ModelAdapter


def _crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    dx, dy = round(w * 0.1), round(h * 0.1)
    return im.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BICUBIC)


def _color(im: Image.Image) -> Image.Image:
    im = ImageEnhance.Brightness(im).enhance(1.25)
    im = ImageEnhance.Contrast(im).enhance(0.8)
    return ImageEnhance.Color(im).enhance(1.3)


def _blur(im: Image.Image) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(im.size) / 64)))


def _rotate(im: Image.Image) -> Image.Image:
    return im.rotate(15, resample=Image.Resampling.BICUBIC, fillcolor=im.getpixel((0, 0)))


PERTURBATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "crop": _crop, "color": _color, "blur": _blur, "rotate": _rotate,
}
PROBES = ("paraphrase", *PERTURBATIONS)


class PerturbedImages(ImageCache):
    """The benchmark's images with one perturbation applied (each image perturbed once)."""

    def __init__(self, bench: Benchmark, transform: Callable[[Image.Image], Image.Image]) -> None:
        super().__init__(bench)
        self.transform = transform
        self._done: dict[str, Image.Image] = {}

    def get(self, e: Example) -> Image.Image | None:
        im = super().get(e)
        if im is None or e.image is None:
            return im
        if e.image not in self._done:
            self._done[e.image] = self.transform(im)
        return self._done[e.image]


def forget_questions(bench: Benchmark, forget: Sequence[str], kind: str = "vqa") -> list[Example]:
    """The forget split's multiple-choice questions of ``kind`` (the benchmark's own prompts and images)."""
    return bench.select("forget", forget, purpose="eval", kind=kind, task="mc")


def paraphrased(bench: Benchmark, questions: Sequence[Example]) -> list[Example]:
    """Each question with a different prompt of the same entity, kind and question type from elsewhere in the
    benchmark (its own image and options kept); questions with no other phrasing are left out."""
    phrasings: dict[tuple[str, str, str], list[str]] = {}
    for e in bench.examples:
        key = (e.entity, e.kind, e.qtype)
        if e.qtype and e.prompt not in phrasings.setdefault(key, []):
            phrasings[key].append(e.prompt)
    out = []
    for q in questions:
        other = [p for p in phrasings.get((q.entity, q.kind, q.qtype), []) if p != q.prompt]
        if other:
            out.append(dataclasses.replace(q, id=f"{q.id}-paraphrase", prompt=other[0]))
    return out


def run_probes(adapter: ModelAdapter, bench: Benchmark, forget: Sequence[str], probes: Sequence[str] = PROBES,
               languages: Sequence[str] = (), batch_size: int = 64, max_new_tokens: int = 24) -> dict:
    """Accuracy (%) of each probe on the forget entities; translated identity prompts give a name rate (%)."""
    bad = [p for p in probes if p not in PROBES]
    if bad:
        raise ConfigError(f"unknown probe(s) {bad}; available: {', '.join(PROBES)}")
    unknown = [lang for lang in languages if lang not in TRANSLATIONS]
    if unknown:
        raise ConfigError(f"no identity prompt for language(s) {unknown}; available: {', '.join(TRANSLATIONS)}")
    questions = forget_questions(bench, forget)
    out: dict = {}
    for name in probes:
        if name == "paraphrase":
            ex, images = paraphrased(bench, questions), ImageCache(bench)
        else:
            ex, images = questions, PerturbedImages(bench, PERTURBATIONS[name])
        if ex:
            pred = rank_options(adapter, ex, images, batch_size)
            out[name] = {"acc": metrics.mc_accuracy(pred, [e.answer_index for e in ex]), "n": len(ex)}
    names = bench.entity_names()
    ident = [e for e in bench.select("forget", forget, purpose="eval", kind="vqa")
             if e.qtype == "identity" and e.task == "gen" and names.get(e.entity)]
    images = ImageCache(bench)
    for lang in languages:
        if ident:
            items = [Item(TRANSLATIONS[lang], "", images.get(e)) for e in ident]
            outs = generate_batched(adapter, items, batch_size, max_new_tokens)
            rate = 100.0 * sum(metrics.mentions(o, names[e.entity]) for o, e in zip(outs, ident)) / len(ident)
            out[f"identity_{lang}"] = {"name_rate": rate, "n": len(ident)}
    return out
