"""Error of a kernel's result in units in the last place (ulps) of its precision.

Log-domain results (log-sum-exp, log-likelihoods) carry an absolute error of a few ulps of
the sums' relative error, so the unit is the spacing of the dtype at ``max(|expected|, 1)``:
an ulp of the value itself for large magnitudes, an ulp of 1 (machine epsilon) near zero.
Flows (gradients) are sums of terms of both signs, so their error is measured normwise:
in ulps of the largest magnitude in the tensor (``normwise=True``).
"""

from __future__ import annotations

import torch


def ulp_errors(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, normwise: bool = False) -> torch.Tensor:
    """Elementwise ``|actual - expected|`` in ulps of ``dtype`` at ``max(|expected|, 1)``, or at
    the largest finite ``|expected|`` when ``normwise`` (0 where both are the same infinity,
    inf where only one is infinite or either is NaN)."""
    a, e = actual.double(), expected.double()
    same = a == e
    if normwise:
        finite = e.abs()[torch.isfinite(e)]
        magnitude = (finite.max() if finite.numel() else e.new_zeros(())).clamp(min=torch.finfo(dtype).tiny)
    else:
        magnitude = e.abs().clamp(min=1.0)
    unit = torch.finfo(dtype).eps * magnitude
    errors = (a - e).abs() / unit
    errors = torch.where(same, torch.zeros_like(errors), errors)
    return torch.where(torch.isnan(errors), torch.full_like(errors, torch.inf), errors)


def assert_ulp_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, max_ulps: float,
                     normwise: bool = False) -> float:
    """Fails unless every element is within ``max_ulps`` (see :func:`ulp_errors`; infinities
    and NaN must agree); returns the largest error in ulps."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    errors = ulp_errors(actual, expected, dtype, normwise)
    worst = float(errors.max()) if errors.numel() else 0.0
    assert worst <= max_ulps, f"{worst:.1f} ulps > {max_ulps} (at {divmod(int(errors.argmax()), max(actual.shape[-1], 1))})"
    return worst
