"""Exact ``log(sum_c w[n, c] * exp(x[c]))`` as a max-shifted matrix product.

This is the operation behind every dense sum layer and behind categorical input
layers under soft evidence. The fast path shares one max shift per row of ``x``
and runs a matrix product; rows whose sums fall near the floating-point floor
(for example a node whose only supported children are far below the row's
maximum) are recomputed exactly with a per-node shift, so the result is exact
logsumexp semantics at matrix-product speed. The backward pass returns
gradients with respect to ``x`` and to the log-weights; the latter are exactly
the edge flows (expected counts) used by EM.
"""

from __future__ import annotations

import torch

# A row whose weighted sum of shifted exponentials falls below this fraction of the
# dtype's largest value's reciprocal is recomputed with a per-node shift.
_SAFE_SUM_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-20, torch.float32: 1e-30, torch.float64: 1e-290}


def _finite_max(x: torch.Tensor) -> torch.Tensor:
    m = x.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _batched_product(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, G, C) x (Gw, N, C) -> (B, G, N) with Gw in {1, G}."""
    b, g, c = e.shape
    if w.shape[0] == 1:
        return (e.reshape(b * g, c) @ w[0].transpose(0, 1)).reshape(b, g, -1)
    return torch.bmm(e.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)


def _exact_rows(x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """Per-node shifted logsumexp for selected rows: x (R, C), logw (R, N, C) -> (R, N)."""
    a = x[:, None, :] + logw
    m = _finite_max(a)
    return torch.log(torch.exp(a - m).sum(-1)) + m.squeeze(-1)


class _LogMatmulExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = torch.exp(logw)
        m = _finite_max(x)
        e = torch.exp(x - m)
        s = _batched_product(e, w)
        floor = _SAFE_SUM_FLOOR[x.dtype]
        bad_rows = (s < floor).any(-1)  # (B, G)
        y = torch.log(s) + m
        bad_index = bad_rows.nonzero()
        if bad_index.numel() > 0:
            bi, gi = bad_index[:, 0], bad_index[:, 1]
            wg = gi if logw.shape[0] > 1 else torch.zeros_like(gi)
            y[bi, gi] = _exact_rows(x[bi, gi], logw[wg])
        ctx.save_for_backward(x, logw, y, m, bad_index)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, logw, y, m, bad_index = ctx.saved_tensors
        w = torch.exp(logw)
        finite = torch.isfinite(y)
        # q[b,g,n] = grad * exp(m - y): bounded on fast rows because their sums exceed the floor.
        q = torch.where(finite, grad_y * torch.exp(m - torch.where(finite, y, m)), torch.zeros_like(y))
        if bad_index.numel() > 0:
            q[bad_index[:, 0], bad_index[:, 1]] = 0.0
        e = torch.exp(x - m)
        grad_x = grad_logw = None
        if ctx.needs_input_grad[0]:
            grad_x = e * _batched_product(q, w.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            if logw.shape[0] == 1:
                b, g, n = q.shape
                grad_w = (q.reshape(b * g, n).transpose(0, 1) @ e.reshape(b * g, -1))[None]
            else:
                grad_w = torch.bmm(q.permute(1, 2, 0), e.transpose(0, 1))
            grad_logw = grad_w * w
        if bad_index.numel() > 0:
            bi, gi = bad_index[:, 0], bad_index[:, 1]
            wg = gi if logw.shape[0] > 1 else torch.zeros_like(gi)
            yb = y[bi, gi]  # (R, N)
            gb = torch.where(torch.isfinite(yb), grad_y[bi, gi], torch.zeros_like(yb))
            a = x[bi, gi][:, None, :] + logw[wg]  # (R, N, C)
            flow = gb[:, :, None] * torch.exp(a - torch.where(torch.isfinite(yb), yb, torch.zeros_like(yb))[:, :, None])
            flow = torch.where(torch.isfinite(yb)[:, :, None], flow, torch.zeros_like(flow))
            if grad_x is not None:
                grad_x[bi, gi] = flow.sum(1)
            if grad_logw is not None:
                grad_logw.index_add_(0, wg, flow)
        return grad_x, grad_logw


def log_matmul_exp(x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """Compute ``y[b, g, n] = log sum_c exp(logw[g, n, c] + x[b, g, c])`` exactly.

    Args:
        x: (B, G, C) log-values of the children of G stacked node groups.
        logw: (G, N, C) or (1, N, C) log-weights (``-inf`` for absent edges); a leading
            dimension of 1 shares one weight matrix among all G groups.

    Returns:
        (B, G, N) log-values. ``-inf`` where every supported child is ``-inf``.
        Differentiable in both arguments; the gradient with respect to ``logw`` is the
        edge flow ``sum_b grad[b,g,n] * exp(logw + x - y)``.
    """
    return _LogMatmulExp.apply(x, logw)
