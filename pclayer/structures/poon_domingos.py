"""Poon-Domingos architectures: rectangular region graphs over image-shaped variables."""

from __future__ import annotations

from pclayer.distributions import Categorical
from pclayer.nodes import NodeGroup, SumGroup, inputs, multiply, summate
from pclayer.structures._checks import outer_product_edges, positive_int, seeded_generator

Rectangle = tuple[int, int, int, int]
"""Rows ``[top, bottom)`` and columns ``[left, right)`` of a region."""


def _pair(value: object, name: str) -> tuple[int, int]:
    """``(rows, cols)`` from an int or a 2-tuple of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return positive_int(value, name), positive_int(value, name)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name}: expected a positive int or a (rows, cols) pair of positive ints, got {value!r}")
    return positive_int(value[0], f"{name}[0]"), positive_int(value[1], f"{name}[1]")


def _cuts(low: int, high: int, step: int) -> list[int]:
    return [p for p in range(low + 1, high) if p % step == 0]


def decompositions(rect: Rectangle, delta: tuple[int, int]) -> list[tuple[Rectangle, Rectangle]]:
    """The ways to split ``rect`` in two: first along rows, then along columns.

    Cuts lie on the coarse grid (multiples of ``delta[0]`` for rows, ``delta[1]`` for
    columns) strictly inside the rectangle. A rectangle inside one coarse cell has no such
    cut; it is split at every position instead (the fine, pixel-level resolution).
    """
    top, bottom, left, right = rect
    rows, cols = _cuts(top, bottom, delta[0]), _cuts(left, right, delta[1])
    if not rows and not cols:
        rows, cols = list(range(top + 1, bottom)), list(range(left + 1, right))
    return ([((top, p, left, right), (p, bottom, left, right)) for p in rows]
            + [((top, bottom, left, p), (top, bottom, p, right)) for p in cols])


def poon_domingos(shape: tuple[int, int], num_cats: int, delta: int | tuple[int, int], num_states: int, *,
                  seed: int | None = None) -> SumGroup:
    """A Poon-Domingos circuit over an image of ``shape = (height, width)`` categorical pixels.

    Pixel ``(row, col)`` is variable ``row * width + col``. Every rectangle reachable from
    the whole image by :func:`decompositions` is one region; regions are built once and
    shared by all parents (the circuit is a DAG). A pixel region is an input group of
    ``num_states`` categorical nodes; a larger region is ``num_states`` sum nodes (one at
    the root) over the outer products (``num_states**2`` products each) of the two halves
    of every decomposition.

    Args:
        shape: ``(height, width)`` of the image, positive ints.
        num_cats: categories K of every pixel.
        delta: spacing of the coarse cut grid, an int or per-axis ``(rows, cols)``.
        num_states: nodes S per region.
        seed: seed of the random initialisation (global RNG if None).

    Returns:
        The root group (one node) over variables ``0..height*width-1``.
    """
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"shape: expected a (height, width) pair of positive ints, got {shape!r}")
    height, width = _pair(shape, "shape")
    num_cats = positive_int(num_cats, "num_cats")
    steps = _pair(delta, "delta")
    num_states = positive_int(num_states, "num_states")
    generator = seeded_generator(seed)
    whole: Rectangle = (0, height, 0, width)
    regions: dict[Rectangle, NodeGroup] = {}

    def region(rect: Rectangle) -> NodeGroup:
        if rect in regions:
            return regions[rect]
        top, bottom, left, right = rect
        if bottom - top == 1 and right - left == 1:
            group: NodeGroup = inputs(top * width + left, num_states, Categorical(num_cats),
                                      name=f"pd.pixel[{top},{left}]", generator=generator)
        else:
            products = []
            for first, second in decompositions(rect, steps):
                a, b = region(first), region(second)
                products.append(multiply(a, b, edges=outer_product_edges(a.num_nodes, b.num_nodes),
                                         name=f"pd.prod[{first}x{second}]"))
            group = summate(*products, num_nodes=1 if rect == whole else num_states,
                            name=f"pd.region[{top}:{bottom},{left}:{right}]", generator=generator)
        regions[rect] = group
        return group

    root = region(whole)
    if height == width == 1:  # the root region is a pixel input group
        return summate(root, num_nodes=1, name="pd.root", generator=generator)
    return root  # type: ignore[return-value]
