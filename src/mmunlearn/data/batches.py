"""Turn schema examples into adapter batches (images opened once and cached)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mmunlearn.data.schema import Benchmark, Example
from mmunlearn.errors import DataError
from mmunlearn.models.base import Item, ModelAdapter


class ImageCache:
    """Opens each image once; a file that is missing or does not decode is a DataError naming it."""

    def __init__(self, bench: Benchmark) -> None:
        self.bench = bench
        self._cache: dict[str, Image.Image] = {}

    def get(self, e: Example) -> Image.Image | None:
        if e.image is None:
            return None
        if e.image not in self._cache:
            self._cache[e.image] = open_image(self.bench.image_path(e))
        return self._cache[e.image]


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: image does not decode ({err.__class__.__name__})") from err


def to_items(examples: Sequence[Example], images: ImageCache, answers: Sequence[str] | None = None) -> list[Item]:
    return [
        Item(e.prompt, e.answer if answers is None else answers[i], images.get(e)) for i, e in enumerate(examples)
    ]


class BatchStream:
    """Endless shuffled batches of encoded examples (a new permutation every epoch, seeded)."""

    def __init__(
        self, adapter: ModelAdapter, examples: Sequence[Example], images: ImageCache, batch_size: int, seed: int = 0
    ) -> None:
        if not examples:
            raise DataError("a training stream needs at least one example")
        self.adapter, self.examples, self.images = adapter, list(examples), images
        self.batch_size = min(batch_size, len(self.examples))
        self.rng = random.Random(seed)
        self.epoch = 0
        self._it = self._batches()

    def __len__(self) -> int:
        return len(self.examples) // self.batch_size

    def _batches(self) -> Iterator[list[Example]]:
        while True:
            order = list(range(len(self.examples)))
            self.rng.shuffle(order)
            for i in range(len(self)):
                yield [self.examples[j] for j in order[i * self.batch_size : (i + 1) * self.batch_size]]
            self.epoch += 1

    def next_examples(self) -> list[Example]:
        return next(self._it)

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.adapter.encode(to_items(self.next_examples(), self.images))

    def __iter__(self) -> BatchStream:
        return self
