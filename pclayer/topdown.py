"""The top-down pass shared by sampling and MPE decoding.

Starting from the root, every active sum node activates one child (drawn in proportion
to weight times bottom-up child value, or the best one for MPE) and every active
product node activates all of its children. Active input nodes then emit values: one
per sample and variable in a smooth, decomposable circuit. The active nodes of a layer
are kept as (draw, node) pairs (:class:`pclayer.layers.ActiveNodes`), so the pass costs
what the active nodes need, not the layer width times the draws.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pclayer.layers import ActiveNodes, Chooser
from pclayer.tables import Tables
from pclayer.runtime import DISABLED
from pclayer.traversal import LayerValues


def top_down(circuit, values: LayerValues, tables: Tables, x: torch.Tensor,
             missing: torch.Tensor | None, evidence: torch.Tensor | None, chooser: Chooser,
             normals: Callable[[int], torch.Tensor] | None,
             draws: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the top-down pass over bottom-up ``values`` with the evaluation's ``tables``:
    choices from linear weights where ``values`` are scaled, else from log-values.

    ``values``, ``x``, ``missing`` and ``evidence`` have one row per draw, or one row shared
    by all ``draws`` (default: one draw per row of ``x``).

    Args:
        chooser: picks one child per active sum node and one value per missing tabular
            input from their log-weights: a draw for sampling, the best for MPE.
        normals: ``count -> standard normals`` for continuous inputs; None for MPE (modes).

    Returns:
        ``(x_out (B, V), node (B, V))`` as in
        :meth:`pclayer.layers.InputLayer.emit`.
    """
    batch = x.shape[0] if draws is None else draws
    device = x.device
    pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in circuit.layer_widths]
    root_layer, root_index = circuit.root
    pending[root_layer].append((torch.arange(batch, device=device), torch.full((batch,), root_index, device=device)))
    layers = circuit.layer_sequence
    for index in range(len(layers) - 1, 0, -1):
        active = ActiveNodes(pending[index], circuit.layer_widths[index], device)
        pending[index] = []
        layers[index].activate(active, values, tables, chooser, pending)
    active = ActiveNodes(pending[0], circuit.layer_widths[0], device)
    scratch = DISABLED if torch.is_grad_enabled() else circuit.runtime.scratch_workspace()
    return layers[0].emit(active, batch, tables, x, missing, evidence, chooser, normals,
                          linear=values.scaled is not None and 0 not in values.logged, scratch=scratch)
