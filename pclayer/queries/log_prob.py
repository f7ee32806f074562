"""Likelihoods, marginals and soft (virtual) evidence."""

from __future__ import annotations

import torch

from pclayer.queries.evidence import prepare
from pclayer.topk import TopKEvidence


def log_prob(circuit, x: torch.Tensor, missing: torch.Tensor | None = None,
             soft_evidence: torch.Tensor | TopKEvidence | None = None) -> torch.Tensor:
    """``log sum_{x_i missing} p(x) * prod_i exp(w[b, i, x_i])`` for every row.

    Args:
        circuit: a :class:`pclayer.TensorCircuit`.
        x: (B, num_vars) LongTensor (float if the circuit has Gaussian variables).
        missing: (B, num_vars) BoolTensor, True = summed out. Default: nothing missing.
        soft_evidence: (B, num_vars, num_cats) log-weights ``w``; the product runs over
            all variables (observed ones contribute the weight of their value), or a
            :class:`~pclayer.TopKEvidence` (k candidates per variable). Default 0.

    Returns:
        (B,) log-values; ``-inf`` for evidence of probability zero. Differentiable with
        respect to the circuit parameters and ``soft_evidence``.
    """
    ev = prepare(circuit, x, missing, soft_evidence)
    return circuit.root_log_value(ev.x, ev.missing, ev.soft_evidence)
