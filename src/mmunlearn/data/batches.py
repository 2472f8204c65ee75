"""Turn schema examples into adapter batches (images opened once and cached)."""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


# larger image files are refused before decoding (the largest real benchmark image is a few MB)
MAX_IMAGE_BYTES = 64 * 2**20


def read_image_bytes(path: Path, where: str = "") -> bytes:
    """The file's bytes, refused (DataError naming ``where``) if it cannot be read or exceeds MAX_IMAGE_BYTES."""
    where = where or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise DataError(f"{where}: image {path} is {size} bytes, over the limit of {MAX_IMAGE_BYTES}")
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{where}: image {path} cannot be read ({err.strerror or err.__class__.__name__})") from err


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes to RGB within Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``).

    Pillow only warns between one and two times the limit; here that is refused too, so a decompression bomb
    never reaches the decoder. Every failure is a DataError naming ``where``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(
            f"{where}: image refused as a decompression bomb (over {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(f"{where}: image does not decode ({err.__class__.__name__})") from err


def open_image(path: Path, where: str = "") -> Image.Image:
    return decode_image(read_image_bytes(path, where), where or str(path))


def to_items(examples: Sequence[Example], images: ImageCache, answers: Sequence[str] | None = None) -> list[Item]:
    return [
        Item(e.prompt, e.answer if answers is None else answers[i], images.get(e)) for i, e in enumerate(examples)
    ]


class BatchStream:
    """Endless shuffled batches of encoded examples (a new permutation every epoch, seeded).

    The position (epoch, permutation, next batch, generator state) is explicit, so ``state_dict`` /
    ``load_state_dict`` let a resumed run draw exactly the batches an uninterrupted one would.
    """

    def __init__(
        self, adapter: ModelAdapter, examples: Sequence[Example], images: ImageCache, batch_size: int, seed: int = 0
    ) -> None:
        if not examples:
            raise DataError("a training stream needs at least one example")
        self.adapter, self.examples, self.images = adapter, list(examples), images
        self.batch_size = min(batch_size, len(self.examples))
        self.rng = random.Random(seed)
        self.epoch = 0
        self._order: list[int] = []
        self._pos = 0  # next batch of the current permutation; a new permutation once it reaches len(self)

    def __len__(self) -> int:
        return len(self.examples) // self.batch_size

    def next_examples(self) -> list[Example]:
        if not self._order or self._pos >= len(self):
            if self._order:
                self.epoch += 1
            self._order = list(range(len(self.examples)))
            self.rng.shuffle(self._order)
            self._pos = 0
        i, self._pos = self._pos, self._pos + 1
        return [self.examples[j] for j in self._order[i * self.batch_size : (i + 1) * self.batch_size]]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: epoch, permutation, next batch and the shuffling generator's state."""
        version, internal, gauss = self.rng.getstate()
        return {"epoch": self.epoch, "order": list(self._order), "pos": self._pos, "n": len(self.examples),
                "rng": [version, list(internal), gauss]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("n") != len(self.examples):
            raise DataError(f"checkpoint stream has {d.get('n')} examples, this run has {len(self.examples)}")
        version, internal, gauss = d["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.epoch, self._order, self._pos = int(d["epoch"]), [int(i) for i in d["order"]], int(d["pos"])

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.adapter.encode(to_items(self.next_examples(), self.images))

    def __iter__(self) -> BatchStream:
        return self
