"""Finite mixtures of circuits over the same variables."""

from __future__ import annotations

import torch

from pclayer.errors import StructureError
from pclayer.nodes import NodeGroup, SumGroup, _format_scope, summate
from pclayer.structures._checks import seeded_generator


def _check_weights(weights: object, count: int) -> torch.Tensor:
    tensor = torch.as_tensor(weights, dtype=torch.float64)
    if tuple(tensor.shape) != (count,):
        raise ValueError(f"weights: expected shape ({count},) (one weight per circuit), got {tuple(tensor.shape)}")
    if torch.isnan(tensor).any():
        raise ValueError(f"weights: expected no NaN, got {tensor.tolist()}")
    if (tensor < 0).any():
        raise ValueError(f"weights: expected non-negative weights, got a minimum of {tensor.min().item():.4g}")
    if abs(tensor.sum().item() - 1.0) > 1e-6:
        raise ValueError(f"weights: expected weights summing to 1, got a sum of {tensor.sum().item():.8g}")
    return tensor


def mixture(*circuits: NodeGroup, weights: object | None = None, seed: int | None = None) -> SumGroup:
    """One sum node mixing the roots of ``circuits``: ``p(x) = sum_i weights[i] * p_i(x)``.

    Args:
        circuits: root groups (one node each) with identical scopes; they may share
            sub-circuits.
        weights: (len(circuits),) non-negative mixture weights summing to 1; random if None.
        seed: seed of the random weights when ``weights`` is None (global RNG if None).

    Returns:
        The root sum group (one node) over the common scope.
    """
    if not circuits:
        raise ValueError("circuits: expected at least one root group")
    for i, circuit in enumerate(circuits):
        if not isinstance(circuit, NodeGroup):
            raise TypeError(f"circuits[{i}]: expected a node group (a circuit root), got {type(circuit).__name__}")
        if circuit.num_nodes != 1:
            raise ValueError(f"circuits[{i}]: expected a root group with one node, got {circuit.name!r} with {circuit.num_nodes}")
        if circuit.scope != circuits[0].scope:
            raise StructureError(
                f"circuits[{i}]: expected the scope {_format_scope(circuits[0].scope)} of circuits[0], "
                f"got {_format_scope(circuit.scope)}"
            )
    generator = seeded_generator(seed)
    params = None if weights is None else _check_weights(weights, len(circuits))[None]
    return summate(*circuits, num_nodes=1, params=params, name="mixture", generator=generator)
