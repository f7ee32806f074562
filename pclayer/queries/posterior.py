"""Exact per-variable posterior marginals."""

from __future__ import annotations

import torch

from pclayer.queries.evidence import prepare, require_positive


def posterior(circuit, x: torch.Tensor, missing: torch.Tensor | None = None,
              soft_evidence: torch.Tensor | None = None) -> torch.Tensor:
    """``p(x_i = k | evidence)`` under the weighted distribution of :func:`log_prob`.

    Computed as the gradient of ``log Z`` with respect to the soft-evidence log-weights
    (one forward and one backward pass): ``d log Z / d w[b, i, k] = P(x_i = k | e)``.

    Returns:
        (B, num_vars, num_cats): rows sum to one over the variable's categories (zeros
        beyond them); one-hot for observed variables.

    Raises:
        ZeroProbabilityError: for rows whose evidence has probability zero.
    """
    if circuit.has_gaussian:
        raise ValueError("circuit: posterior is defined for discrete variables only; this circuit has Gaussian variables")
    ev = prepare(circuit, x, missing, soft_evidence)
    weights = ev.soft_evidence if ev.soft_evidence is not None else torch.zeros(
        x.shape[0], circuit.num_vars, circuit.num_cats, dtype=circuit.dtype, device=circuit.device)
    weights = weights.detach().requires_grad_(True)
    with torch.enable_grad():
        log_z = circuit.root_value(circuit.layer_values(ev.x, ev.missing, weights))
        require_positive(log_z.detach(), "posterior")
        (grad,) = torch.autograd.grad(log_z.sum(), weights)
    return grad
