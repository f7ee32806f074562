"""The top-down pass shared by sampling and MPE decoding.

Starting from the root, every active sum node activates one child (drawn in proportion
to weight times bottom-up child value, or the best one for MPE) and every active
product node activates all of its children. Active input nodes then emit values: one
per sample and variable in a smooth, decomposable circuit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pclayer.layers import Chooser
from pclayer.traversal import LayerValues


def top_down(circuit, values: LayerValues, tables: dict[str, torch.Tensor], x: torch.Tensor,
             missing: torch.Tensor | None, evidence: torch.Tensor | None, chooser: Chooser,
             uniforms: Callable[[int, int], torch.Tensor] | None,
             normals: Callable[[int], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the top-down pass over bottom-up ``values`` (log-values read per layer).

    Args:
        uniforms: ``(batch, num_nodes) -> uniforms`` called once per layer from the top
            (so a kernel given the same uniforms chooses identically); None for MPE.
        normals: ``count -> standard normals`` for Gaussian inputs; None for MPE.

    Returns:
        ``(x_out (B, V), node (B, V), node_log_probs (B, V, K))`` as in
        :meth:`pclayer.layers.InputLayer.emit`.
    """
    batch = x.shape[0]
    active = [torch.zeros(batch, width, dtype=torch.bool, device=x.device) for width in circuit.layer_widths]
    root_layer, root_index = circuit.root
    active[root_layer][:, root_index] = True
    for index in range(len(circuit.layers) - 1, 0, -1):
        layer = circuit.layers[index]
        u = uniforms(batch, circuit.layer_widths[index]) if uniforms is not None else None
        active_z = layer.select(active[index], values, tables, chooser, u)
        layer.scatter_active(active_z, active)
    u = uniforms(batch, circuit.layer_widths[0]) if uniforms is not None else None
    return circuit.layers[0].emit(active[0], tables, x, missing, evidence, chooser, u, normals, circuit.num_cats)
