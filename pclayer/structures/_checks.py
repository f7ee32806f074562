"""Argument checks shared by the structure builders."""

from __future__ import annotations

from functools import lru_cache

import torch


def positive_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def seeded_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``, or ``None`` (global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or None, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def outer_product_edges(left: int, right: int) -> torch.Tensor:
    """(left * right, 2) edges of :func:`pclayer.multiply` pairing every node of two children."""
    return _outer_product_edges(left, right).clone()


@lru_cache(maxsize=64)
def _outer_product_edges(left: int, right: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(left), torch.arange(right)).reshape(left * right, 2)
