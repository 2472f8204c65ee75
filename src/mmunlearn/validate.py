"""Checks that run before any model is loaded, so a bad input costs seconds instead of a training run.

Every image the benchmark references is read and decoded here (not only the ones a run happens to sample),
inside the data directory and within the byte and pixel limits of ``data.batches``; the forget set must be
non-empty, name known entities and share no image with the retain set; the model directory must exist and
belong to a known family; the output directory must be free. Each failure is one of the project's errors,
one line naming the file and the field.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import torch

from mmunlearn.data.batches import decode_image, read_image_bytes
from mmunlearn.data.schema import Benchmark
from mmunlearn.errors import ConfigError, DataError, ModelError, NonFiniteError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def check_images(bench: Benchmark) -> dict[str, str]:
    """Read and decode every image the benchmark references, once each; returns image -> sha256 of its bytes."""
    hashes: dict[str, str] = {}
    where_file = bench.root / "examples.jsonl"
    for e in bench.examples:
        if e.image is None or e.image in hashes:
            continue
        where = f"{where_file}: example {e.id!r} field 'image' ({e.image})"
        data = read_image_bytes(bench.image_path(e), where)  # image_path refuses paths escaping the directory
        decode_image(data, where).close()
        hashes[e.image] = hashlib.sha256(data).hexdigest()
    return hashes


def check_examples(bench: Benchmark) -> None:
    """Example ids are unique (results and caches are keyed by them)."""
    dup = [i for i, n in Counter(e.id for e in bench.examples).items() if n > 1]
    if dup:
        raise DataError(f"{bench.root / 'examples.jsonl'}: field 'id' {dup[0]!r} occurs more than once")
    if not bench.examples:
        raise DataError(f"{bench.root / 'examples.jsonl'}: no examples")


def check_forget(bench: Benchmark, forget: list[str], image_hashes: dict[str, str], where: str) -> None:
    """The forget set is non-empty, names entities of the benchmark and shares no image with the retain set.

    ``where`` names the file and field the forget set came from (benchmark.json's ``forget_sets.<name>`` or
    the option ``entities``). The retain set is every other person: an image file (by content) that belongs to
    a forget entity and to a retain entity would be re-learned by every retain step.
    """
    if not forget:
        raise DataError(f"{where}: the forget set is empty")
    people = {e.entity for e in bench.examples if e.split in ("people", "test")}
    unknown = [e for e in forget if e not in people]
    if unknown:
        raise DataError(f"{where}: entity {unknown[0]!r} is not in {bench.root / 'examples.jsonl'}")
    fset = set(forget)
    owner: dict[str, tuple[str, str]] = {}
    for e in bench.examples:
        if e.image is not None and e.split in ("people", "test") and e.entity in fset:
            owner.setdefault(image_hashes[e.image], (e.entity, e.image))
    for e in bench.examples:
        if e.image is None or e.split != "people" or e.entity in fset:
            continue
        hit = owner.get(image_hashes[e.image])
        if hit is not None:
            raise DataError(
                f"{bench.root / 'examples.jsonl'}: example {e.id!r} field 'image' ({e.image}) of retain entity "
                f"{e.entity!r} is the same image as {hit[1]} of forget entity {hit[0]!r}: forget and retain overlap"
            )


def forget_source(bench: Benchmark, forget_set: str | None, entities: list[str] | None) -> tuple[list[str], str]:
    """The forget entities and where they were named (for error messages); explicit entities win."""
    if entities:
        return sorted(set(entities)), "option entities"
    name = forget_set or ""
    where = f"{bench.root / 'benchmark.json'} field 'forget_sets.{name}'"
    members = bench.forget_set(name)  # an unknown name is a DataError listing the available ones
    if not isinstance(bench.forget_sets[name], list) or not all(isinstance(m, str) for m in bench.forget_sets[name]):
        raise DataError(f"{where}: expected a list of entity ids")
    return sorted(members), where


def check_model(model: str, family: str | None) -> None:
    """The model is ``tiny`` or a directory with config.json and weights, of a known (and matching) family."""
    from mmunlearn.models import FAMILIES, family_of

    if family is not None and family not in FAMILIES:
        raise ConfigError(f"option --family: unknown model family {family!r}; available: {', '.join(FAMILIES)}")
    if model == "tiny" or family == "tiny" and not Path(model).is_dir():
        return
    if model == "smol" and not Path(model).exists():
        from mmunlearn.models.smol import smol_available

        if not smol_available():
            from mmunlearn.models.smol import INSTALL_HINT

            raise ModelError(f"--model smol: its weights are not installed; {INSTALL_HINT}")
        return
    p = Path(model)
    if not p.exists():
        if family is None:
            raise ModelError(f"model directory does not exist: {model}")
        return  # a hub id in the local cache, resolved by the loader
    if not p.is_dir():
        raise ModelError(f"{model}: not a model directory")
    found = family_of(p)  # config.json present, valid and of a supported model_type
    if family not in (None, "tiny") and found != family:
        raise ModelError(f"{p / 'config.json'} field 'model_type': a {found!r} model, not family {family!r}")
    if not any(f.suffix in WEIGHT_SUFFIXES for f in p.iterdir() if f.is_file()):
        raise ModelError(f"{model}: no weights (*.safetensors) in the model directory")


def check_data(data: str) -> tuple[Benchmark, dict[str, str]]:
    """Load the benchmark (schema checked by the loader), check its ids and every image; also the image hashes."""
    bench = Benchmark.load(data)
    check_examples(bench)
    return bench, check_images(bench)


def check_finite_weights(params: dict[str, torch.Tensor]) -> None:
    """After training, before anything is saved: every trained tensor is finite (NaN weights are no result)."""
    bad = [n for n, p in params.items() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise NonFiniteError(
            f"{len(bad)} of {len(params)} trained tensors hold NaN or inf after training (e.g. {bad[0]!r}); "
            "nothing was saved (lower lr)"
        )
