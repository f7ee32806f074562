"""A logsumexp whose gradient is zero (not NaN) where the result is ``-inf``."""

from __future__ import annotations

import torch


class _MaskedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        m = a.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        y = torch.log(torch.exp(a - m).sum(-1)) + m.squeeze(-1)
        ctx.save_for_backward(a, y)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        a, y = ctx.saved_tensors
        finite = torch.isfinite(y)
        safe_y = torch.where(finite, y, torch.zeros_like(y))
        g = torch.where(finite, grad_y, torch.zeros_like(grad_y))
        return g[..., None] * torch.exp(a - safe_y[..., None])


def masked_logsumexp(a: torch.Tensor) -> torch.Tensor:
    """``log(sum(exp(a), dim=-1))`` for any shape (..., F); rows of all ``-inf`` give ``-inf``
    with a zero gradient."""
    return _MaskedLogSumExp.apply(a)
