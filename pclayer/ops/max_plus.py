"""Max-plus matrix product of the max-product (MPE) representation, in cache-sized chunks."""

from __future__ import annotations

import torch

MAX_PLUS_CHUNK = 1 << 20
"""Elements of the (rows, N, C) max-plus temporaries formed at a time (4 MB in float32)."""


def max_plus(x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """``y[b, g, n] = max_c x[b, g, c] + logw[g|0, n, c]``: x (B, G, C), logw (G|1, N, C) -> (B, G, N).

    Computed a chunk of rows (or nodes) at a time, :data:`MAX_PLUS_CHUNK` elements of
    temporaries, never the whole (B, G, N, C) tensor. ``-inf`` entries are absorbing and NaN
    propagates (``torch.amax``). Not differentiable: MPE runs without gradients (torch refuses
    ``amax(out=...)`` on inputs that require grad)."""
    batch, groups, children = x.shape
    nodes = logw.shape[1]
    out = x.new_empty(batch, groups, nodes)
    for g in range(groups):
        w = logw[g if logw.shape[0] > 1 else 0]  # (N, C)
        rows = max(1, MAX_PLUS_CHUNK // max(nodes * children, 1))
        node_step = nodes if rows > 1 else max(1, MAX_PLUS_CHUNK // max(children, 1))
        for b0 in range(0, batch, rows):
            xb = x[b0:b0 + rows, g, None, :]  # (r, 1, C)
            for n0 in range(0, nodes, node_step):
                torch.amax(xb + w[None, n0:n0 + node_step], dim=-1, out=out[b0:b0 + rows, g, n0:n0 + node_step])
    return out
