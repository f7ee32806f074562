"""Randomised tensorised sum-product networks (RAT-SPN) over categorical variables."""

from __future__ import annotations

import torch

from pclayer.distributions import Categorical
from pclayer.nodes import NodeGroup, SumGroup, inputs, multiply, summate
from pclayer.structures._checks import outer_product_edges, positive_int, seeded_generator


class _Builder:
    """Builds the region graph of one repetition; holds the shared sizes and generator."""

    def __init__(self, num_cats: int, num_states: int, generator: torch.Generator | None):
        self.num_cats = num_cats
        self.num_states = num_states
        self.generator = generator

    def leaf_region(self, variables: list[int], label: str) -> NodeGroup:
        """``num_states`` fully factorised products of one categorical input group per variable."""
        groups = [
            inputs(var, self.num_states, Categorical(self.num_cats), name=f"{label}.x{var}", generator=self.generator)
            for var in variables
        ]
        return groups[0] if len(groups) == 1 else multiply(*groups, name=f"{label}.leaf")

    def partition(self, variables: list[int], depth: int, label: str) -> NodeGroup:
        """Products over ``variables``: outer product of the two halves' regions (leaf region at depth 0)."""
        if depth == 0:
            return self.leaf_region(variables, label)
        half = len(variables) // 2
        left = self.region(variables[:half], depth - 1, f"{label}.L")
        right = self.region(variables[half:], depth - 1, f"{label}.R")
        return multiply(left, right, edges=outer_product_edges(left.num_nodes, right.num_nodes), name=f"{label}.prod")

    def region(self, variables: list[int], depth: int, label: str) -> NodeGroup:
        """``num_states`` nodes over ``variables``: sums over the partition (the leaf region at depth 0)."""
        if depth == 0:
            return self.leaf_region(variables, label)
        return summate(self.partition(variables, depth, label), num_nodes=self.num_states,
                       name=f"{label}.sum", generator=self.generator)


def rat_spn(num_vars: int, num_cats: int, depth: int, num_repetitions: int, num_states: int, *,
            seed: int | None = None) -> SumGroup:
    """A RAT-SPN: a mixture of random binary region trees over variables ``0..num_vars-1``.

    Each repetition draws a random permutation of the variables and splits it in halves
    (first ``n // 2`` variables, then the rest) recursively ``depth`` times, giving
    ``2**depth`` leaf regions. A leaf region is ``num_states`` fully factorised products of
    univariate categorical input groups (``num_states`` nodes per variable). An internal
    region multiplies every node of its left child region with every node of its right one
    (``num_states**2`` products) and sums them into ``num_states`` nodes. The root is one sum
    node over the products of every repetition's top region.

    Args:
        num_vars: number of variables V; must be at least ``2**depth``.
        num_cats: categories K of every variable.
        depth: number of recursive splits (0 = a mixture of fully factorised distributions).
        num_repetitions: number R of random region trees mixed at the root.
        num_states: nodes S per region (and per input group).
        seed: seed of the permutations and the random initialisation (global RNG if None).

    Returns:
        The root group (one node). Free parameters: ``R * V * S * (K - 1)`` for inputs,
        ``R * (2**depth - 2) * S * (S**2 - 1)`` for internal sums below the root (depth >= 1),
        and ``R * S**2 - 1`` at the root (``R * S - 1`` at depth 0).
    """
    num_vars = positive_int(num_vars, "num_vars")
    num_cats = positive_int(num_cats, "num_cats")
    depth = positive_int(depth, "depth", minimum=0)
    num_repetitions = positive_int(num_repetitions, "num_repetitions")
    num_states = positive_int(num_states, "num_states")
    if 2**depth > num_vars:
        raise ValueError(
            f"depth: {depth} splits need at least 2**depth = {2**depth} variables, got num_vars = {num_vars}; "
            f"use depth <= {num_vars.bit_length() - 1}"
        )
    generator = seeded_generator(seed)
    builder = _Builder(num_cats, num_states, generator)
    tops: list[NodeGroup] = []
    for rep in range(num_repetitions):
        order = torch.randperm(num_vars, generator=generator).tolist()
        tops.append(builder.partition(order, depth, f"rat.rep{rep}"))
    return summate(*tops, num_nodes=1, name="rat.root", generator=generator)

