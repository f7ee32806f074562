"""Exact per-variable posterior marginals."""

from __future__ import annotations

import torch

from pclayer.queries.evidence import Evidence, prepare, require_positive
from pclayer.topk import TopKEvidence


def posterior(circuit, x: torch.Tensor, missing: torch.Tensor | None = None,
              soft_evidence: torch.Tensor | TopKEvidence | None = None) -> torch.Tensor:
    """``p(x_i = k | evidence)`` under the weighted distribution of :func:`log_prob`.

    Computed as the gradient of ``log Z`` with respect to the soft-evidence log-weights
    (one forward and one backward pass): ``d log Z / d w[b, i, k] = P(x_i = k | e)``.
    With :class:`~pclayer.TopKEvidence` the gradient is taken with respect to the k
    candidate weights only (no dense evidence is built) and scattered into the dense
    result, zero outside the candidates; a missing variable marked ``free`` needs its
    whole row, so such evidence goes through the dense path.

    Returns:
        (B, num_vars, num_cats): rows sum to one over the variable's categories (zeros
        beyond them); one-hot for observed variables.

    Raises:
        ZeroProbabilityError: for rows whose evidence has probability zero.
    """
    if circuit.has_continuous:
        raise ValueError("circuit: posterior is defined for discrete variables only; this circuit has continuous variables")
    ev = prepare(circuit, x, missing, soft_evidence)
    evidence = ev.soft_evidence
    if isinstance(evidence, TopKEvidence):
        free_missing = evidence.free is not None and ev.missing is not None and bool((evidence.free & ev.missing).any())
        if not free_missing:
            return _topk_posterior(circuit, ev, evidence)
        evidence = evidence.to_dense(circuit.num_cats)
    weights = evidence if evidence is not None else torch.zeros(
        x.shape[0], circuit.num_vars, circuit.num_cats, dtype=circuit.dtype, device=circuit.device)
    weights = weights.detach().requires_grad_(True)
    with torch.enable_grad():
        # the posterior is not differentiable: the parameters are constants
        log_z = circuit.root_log_value(ev.x, ev.missing, weights, constant_parameters=True)
        require_positive(log_z.detach(), "posterior")
        (grad,) = torch.autograd.grad(log_z.sum(), weights)
    return grad


def _topk_posterior(circuit, ev: Evidence, evidence: TopKEvidence) -> torch.Tensor:
    """Posterior under top-k evidence whose free variables are all observed: the gradient of
    ``log Z`` w.r.t. the candidate weights, scattered; one-hot at observed variables."""
    values = evidence.values.detach().requires_grad_(True)
    sparse = TopKEvidence(values, evidence.indices, evidence.free)
    with torch.enable_grad():
        log_z = circuit.root_log_value(ev.x, ev.missing, sparse, constant_parameters=True)
        require_positive(log_z.detach(), "posterior")
        (grad,) = torch.autograd.grad(log_z.sum(), values)
    batch = ev.x.shape[0]
    out = torch.zeros(batch, circuit.num_vars, circuit.num_cats, dtype=grad.dtype, device=grad.device)
    out.scatter_(-1, evidence.indices, grad)
    observed = ~ev.missing if ev.missing is not None else torch.ones_like(ev.x, dtype=torch.bool)
    one_hot = torch.zeros_like(out).scatter_(-1, ev.x.unsqueeze(-1), 1.0)
    return torch.where(observed.unsqueeze(-1), one_hot, out)
