"""Semirings that give the compiled layers their meaning.

``LOG_SUM`` (log-probabilities; sums are log-sum-exp) answers likelihoods, marginals and
soft evidence; ``MAX_PRODUCT`` (log-space max-product) answers MPE. Both use addition
for products, so only sum nodes and marginalised inputs differ.
"""

from __future__ import annotations

import math

import torch

from pclayer.ops import dispatch
from pclayer.ops.sparse_evidence import candidate_log_weights


class Semiring:
    """Interface: how a layer combines log-values of children."""

    name = "semiring"

    def sum_dense(self, x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
        """x (B, G, C), logw (G|1, N, C) -> (B, G, N)."""
        raise NotImplementedError

    def sum_padded(self, a: torch.Tensor) -> torch.Tensor:
        """a (B, N, F) = child value + log-weight (``-inf`` pads) -> (B, N)."""
        raise NotImplementedError

    def topk_evidence(self, values: torch.Tensor, indices: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """Discrete input summed out under top-k evidence: values, indices (B, G, k),
        logp (G|1, n, K) -> (B, G, n) combining ``values + logp[indices]`` over the k candidates."""
        raise NotImplementedError

    def no_evidence(self, logp: torch.Tensor) -> torch.Tensor:
        """Value of a discrete input summed out without evidence: logp (G|1, n, K) -> (G|1, n)."""
        raise NotImplementedError

    def gaussian_no_evidence(self, log_std: torch.Tensor) -> torch.Tensor:
        """Value of a Gaussian input summed out: log_std (G, n) -> (G, n)."""
        raise NotImplementedError


class LogSumSemiring(Semiring):
    name = "log-sum"

    def sum_dense(self, x, logw):
        return dispatch.sum_dense(x, logw)

    def sum_padded(self, a):
        return dispatch.logsumexp(a)

    def topk_evidence(self, values, indices, logp):
        return dispatch.categorical_topk_evidence(values, indices, logp)

    def no_evidence(self, logp):
        return dispatch.logsumexp(logp)

    def gaussian_no_evidence(self, log_std):
        return torch.zeros_like(log_std)


class MaxProductSemiring(Semiring):
    name = "max-product"

    def sum_dense(self, x, logw):
        return (x[:, :, None, :] + logw[None]).amax(-1)

    def sum_padded(self, a):
        return a.amax(-1)

    def topk_evidence(self, values, indices, logp):
        return candidate_log_weights(values, indices, logp).amax(-1)

    def no_evidence(self, logp):
        return logp.amax(-1)

    def gaussian_no_evidence(self, log_std):
        return -log_std - 0.5 * math.log(2 * math.pi)


LOG_SUM = LogSumSemiring()
MAX_PRODUCT = MaxProductSemiring()
