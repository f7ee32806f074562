"""Categorical input nodes under top-k sparse soft evidence (torch path)."""

from __future__ import annotations

import torch

from pclayer.ops.masked_logsumexp import masked_logsumexp


def candidate_log_weights(values: torch.Tensor, indices: torch.Tensor, log_table: torch.Tensor) -> torch.Tensor:
    """``a[b,g,n,j] = values[b,g,j] + log theta[g,n,indices[b,g,j]]``: (B, G, k) with a
    (G|1, n, K) table -> (B, G, n, k), differentiable in ``values`` and ``log_table``.

    The candidates are read with one ``gather`` over the table's (n, G*K) columns (the index
    broadcast over the n rows), whose gradient is a single table-sized accumulation: never a
    (B, G, n, K) tensor."""
    batch, groups, k = values.shape
    table_groups, nodes, cats = log_table.shape
    if table_groups == 1:
        columns, flat = log_table[0], indices.reshape(-1)
    else:
        columns = log_table.permute(1, 0, 2).reshape(nodes, table_groups * cats)
        offsets = torch.arange(groups, device=indices.device).view(1, groups, 1) * cats
        flat = (indices + offsets).reshape(-1)
    picked = columns.gather(1, flat.expand(nodes, -1)).view(nodes, batch, groups, k).permute(1, 2, 0, 3)
    return values[:, :, None, :] + picked


def categorical_topk_evidence(values: torch.Tensor, indices: torch.Tensor, log_table: torch.Tensor) -> torch.Tensor:
    """``y[b,g,n] = log sum_j exp(values[b,g,j]) * theta[g,n,indices[b,g,j]]``.

    Args:
        values: (B, G, k) log-weights of the k categories kept per variable.
        indices: (B, G, k) int64 categories in [0, K) (repeats add up).
        log_table: (G, n, K) or (1, n, K) log-probabilities theta of n categorical nodes
            per group (a leading 1 is shared by all groups).

    Returns:
        (B, G, n) log-values; differentiable in ``values`` and ``log_table``.
    """
    return masked_logsumexp(candidate_log_weights(values, indices, log_table))
