"""Categorical input nodes under top-k sparse soft evidence (torch path)."""

from __future__ import annotations

import torch

from pclayer.ops.masked_logsumexp import masked_logsumexp


def candidate_log_weights(values: torch.Tensor, indices: torch.Tensor, log_table: torch.Tensor) -> torch.Tensor:
    """``a[b,g,n,j] = values[b,g,j] + log theta[g,n,indices[b,g,j]]``: (B, G, k) with a
    (G|1, n, K) table -> (B, G, n, k), differentiable in ``values`` and ``log_table``."""
    batch, groups, _ = values.shape
    table = log_table.expand(groups, -1, -1)
    nodes = table.shape[1]
    picked = table[None].expand(batch, -1, -1, -1).gather(3, indices[:, :, None, :].expand(-1, -1, nodes, -1))
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
