"""Number representations of the one traversal (:mod:`pclayer.traversal`).

A representation says how layer outputs hold numbers and gives the formulas that differ
between representations: the dense sum, the padded (sparse) sum, and the value of an input
summed out. Products are additions in log space and multiplications in linear space.

* :data:`LOG_SUM`: log-probabilities; sums are exact log-sum-exp (max-shifted matrix
  products, rows near the floor recomputed per node). Likelihoods, marginals, soft evidence.
* :data:`MAX_PRODUCT`: log space, sums are maxima (MPE). The max-plus product is computed in
  chunks that stay in cache, never as one (B, G, N, C) tensor.
* :data:`SCALED`: linear probabilities ``p`` with a per-row log-scale ``c`` (value
  ``log p + c``): sums are plain matrix products and products multiply. An entry below
  :data:`pclayer.numerics.SAFE_FLOOR` could have underflowed, so the traversal computes that layer in
  :data:`LOG_SUM` instead (see :mod:`pclayer.traversal`).

Each formula exists once per representation: here, in :mod:`pclayer.ops.linear_sums` (the
scaled dense sum, which the fused cross-product sums also use) and behind
:mod:`pclayer.ops.dispatch` (the log-sum and max-product dense sums, with their CUDA twins).
"""

from __future__ import annotations

import torch

from pclayer.numerics import RENORMALISE_BELOW, SAFE_FLOOR
from pclayer.ops import dispatch
from pclayer.ops.linear_sums import linear_sums
from pclayer.ops.normalised_mass import normalised_log_mass
from pclayer.ops.sparse_evidence import candidate_log_weights

def _backend(runtime) -> str:
    """The backend chosen for a circuit's :class:`~pclayer.runtime.Runtime` (``"auto"`` without one)."""
    return "auto" if runtime is None else runtime.backend


class LogSum:
    """Log-probabilities, exact log-sum-exp sums."""

    name = "log-sum"

    def sum_dense(self, x: torch.Tensor, logw: torch.Tensor, runtime=None) -> torch.Tensor:
        """x (B, G, C), logw (G|1, N, C) -> (B, G, N)."""
        return dispatch.sum_dense(x, logw, backend=_backend(runtime), record=runtime)

    def sum_padded(self, a: torch.Tensor, runtime=None) -> torch.Tensor:
        """a (B, N, F) = child value + log-weight (``-inf`` pads) -> (B, N)."""
        return dispatch.logsumexp(a, backend=_backend(runtime), record=runtime)

    def topk_evidence(self, values: torch.Tensor, indices: torch.Tensor, logp: torch.Tensor,
                      runtime=None) -> torch.Tensor:
        """Discrete input summed out under top-k evidence: values, indices (B, G, k),
        logp (G|1, n, K) -> (B, G, n)."""
        return dispatch.categorical_topk_evidence(values, indices, logp, backend=_backend(runtime), record=runtime)

    def no_evidence(self, logp: torch.Tensor, runtime=None) -> torch.Tensor:
        """Discrete input summed out without evidence: logp (G|1, n, K) normalised -> (G|1, n)
        zeros, with the gradient of log-sum-exp (no launch, on any backend)."""
        return normalised_log_mass(logp)

    def continuous_summed_out(self, distribution, bank: torch.Tensor) -> torch.Tensor:
        """Continuous input summed out: (G, n) zeros (densities integrate to one)."""
        return torch.zeros_like(bank[:, 0])


class MaxProduct:
    """Log space, maxima for sums (MPE)."""

    name = "max-product"

    def sum_dense(self, x: torch.Tensor, logw: torch.Tensor, runtime=None) -> torch.Tensor:
        """``max_c x[b, g, c] + logw[g, n, c]``: x (B, G, C), logw (G|1, N, C) -> (B, G, N),
        never as one (B, G, N, C) tensor (see :func:`pclayer.ops.dispatch.max_plus`)."""
        return dispatch.max_plus(x, logw, backend=_backend(runtime), record=runtime)

    def sum_padded(self, a: torch.Tensor, runtime=None) -> torch.Tensor:
        return a.amax(-1)

    def topk_evidence(self, values, indices, logp, runtime=None):
        return candidate_log_weights(values, indices, logp).amax(-1)

    def no_evidence(self, logp, runtime=None):
        return logp.amax(-1)

    def continuous_summed_out(self, distribution, bank):
        """Continuous input maximised out: its density at the mode (G, n)."""
        return distribution.log_mode_density(bank)


class Scaled:
    """Linear probabilities with a per-row log-scale."""

    name = "scaled"

    def sum_dense(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G*N) sums of one dense bucket: ``x`` (B, G, C) probabilities, ``w`` (C, N)
        weights shared by every group or (G, C, N); ``out`` an optional (B, G*N) buffer
        (:func:`pclayer.ops.linear_sums.linear_sums`)."""
        return linear_sums(x, w, out)

    def sum_padded(self, a: torch.Tensor) -> torch.Tensor:
        """a (B, N, F) = child probability times weight (0 pads) -> (B, N)."""
        return a.sum(-1)


LOG_SUM = LogSum()
MAX_PRODUCT = MaxProduct()
SCALED = Scaled()


class ScaledValue:
    """One layer output in the scaled representation: probabilities ``p`` (B, n), log-scale
    ``c`` (B, 1) (None = 0) and a proven lower bound ``low`` on every entry of ``p`` (all
    entries are at least the floor)."""

    __slots__ = ("p", "c", "low")

    def __init__(self, p: torch.Tensor, c: torch.Tensor | None, low: float):
        self.p, self.c, self.low = p, c, low


def log_values(p: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """Log-values ``log p + c`` of scaled probabilities ``p`` (B, n) with log-scale ``c`` (B, 1) or None."""
    return p.log() if c is None else p.log() + c


def add_scales(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of two optional (B, 1) log-scales."""
    if a is None:
        return b
    return a if b is None else a + b


def checked(p: torch.Tensor, c: torch.Tensor | None, low: float, owned: bool = False) -> ScaledValue | None:
    """Accept a scaled layer output whose entries are all at least the floor (``low`` is a
    proven lower bound, measured only when it does not settle the question), dividing its rows
    by their maximum when its smallest entry gets small. None = not exact in linear space.

    Every factor of a product and every term of a sum is at most 1, so an entry at least the
    floor had no partial result underflow (products) or only dropped terms far below its own
    precision (sums). ``owned``: ``p`` is this layer's own buffer, so it may be divided in place."""
    floor, renormalise_below = SAFE_FLOOR[p.dtype], RENORMALISE_BELOW[p.dtype]
    if low < renormalise_below and p.numel():
        row_min, row_max = torch.aminmax(p.detach(), dim=1, keepdim=True)
        low = float(row_min.min())
        if not low >= floor:  # also catches NaN
            return None
        if low < renormalise_below:
            row_max = row_max.clamp_min_(torch.finfo(p.dtype).tiny)  # (a row of zeros, possible only with a zero floor, stays zero)
            low = float((row_min / row_max).min())
            return ScaledValue(p.div_(row_max) if owned else p / row_max, add_scales(c, row_max.log()), low)
    return ScaledValue(p, c, low)


def rescaled(log_values: torch.Tensor) -> ScaledValue | None:
    """Log-values (B, n) in the scaled representation (each row shifted by its maximum), or
    None where some entry would fall below the floor."""
    top = log_values.detach().amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return checked(torch.exp(log_values - top), top, 0.0)
