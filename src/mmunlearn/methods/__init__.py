"""Unlearning methods: one class per file, registered by name in ``METHODS``.

Importing this package registers every built-in method; ``get_method(name)`` looks one up (an unknown name is
a ConfigError with a suggestion).
"""

from __future__ import annotations

from mmunlearn.methods import ga, ga_diff, ga_kl, kl_min, mmunlearner, npo, po, siu  # noqa: F401  (registration)
from mmunlearn.methods.base import METHODS, Batches, Context, Method, Step, register


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "Batches", "Context", "Method", "Step", "get_method", "register"]
