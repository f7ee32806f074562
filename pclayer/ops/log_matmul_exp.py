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

from pclayer.numerics import SAFE_FLOOR

# Temporaries (exponentiated inputs and weights) are capped at about this many elements by
# splitting the child dimension C into chunks: a categorical input under soft evidence over a
# 126K-token vocabulary never materialises exp(x) or exp(logw) for the whole vocabulary.
_CHUNK_ELEMENTS = 1 << 22


def _chunks(x: torch.Tensor, logw: torch.Tensor) -> list[tuple[int, int]]:
    """(start, width) slices of the child dimension, one if everything fits the budget."""
    b, g, c = x.shape
    per_column = b * g + logw.shape[0] * logw.shape[1]
    width = max(1024, _CHUNK_ELEMENTS // max(per_column, 1))
    return [(start, min(width, c - start)) for start in range(0, c, width)] if c > width else [(0, c)]


def _finite_max(x: torch.Tensor) -> torch.Tensor:
    m = x.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _batched_product(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, G, C) x (Gw, N, C) -> (B, G, N) with Gw in {1, G}."""
    b, g, c = e.shape
    if w.shape[0] == 1:
        return (e.reshape(b * g, c) @ w[0].transpose(0, 1)).reshape(b, g, w.shape[1])
    return torch.bmm(e.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)


def _exact_rows(x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """Per-node shifted logsumexp for selected rows: x (R, C), logw (R, N, C) -> (R, N)."""
    a = x[:, None, :] + logw
    m = _finite_max(a)
    return torch.log(torch.exp(a - m).sum(-1)) + m.squeeze(-1)


def _fast_grads(needs: tuple[bool, ...], x: torch.Tensor, m: torch.Tensor, w: torch.Tensor,
                q: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. x (B, G, C) and logw (G|1, N, C) given w = exp(logw) and
    q = grad * exp(m - y) (B, G, N): ``e * (q @ w)`` and ``(q^T @ e) * w`` with e = exp(x - m)."""
    e = (x - m).exp_()
    grad_x = grad_logw = None
    if needs[1]:  # before grad_x, which reuses e's memory
        if w.shape[0] == 1:
            b, g, n = q.shape
            grad_w = (q.reshape(b * g, n).transpose(0, 1) @ e.reshape(b * g, e.shape[-1]))[None]
        else:
            grad_w = torch.bmm(q.permute(1, 2, 0), e.transpose(0, 1))
        grad_logw = grad_w.mul_(w)
    if needs[0]:
        grad_x = e.mul_(_batched_product(q, w.transpose(1, 2)))
    return grad_x, grad_logw


class _LogMatmulExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        m = x.amax(dim=-1, keepdim=True).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        chunks = _chunks(x, logw)
        if len(chunks) == 1:
            w = torch.exp(logw)
            s = _batched_product((x - m).exp_(), w)
        else:  # bounded memory: accumulate the product chunk by chunk; backward recomputes exp(logw)
            w = torch.empty(0, dtype=logw.dtype, device=logw.device)
            s = sum(_batched_product((x.narrow(2, c0, cw) - m).exp_(), torch.exp(logw.narrow(2, c0, cw)))
                    for c0, cw in chunks)
        floor = SAFE_FLOOR[x.dtype]
        # Fast path (the usual case): every sum clears the floor, so one scalar check suffices
        # and the logarithm runs in place.
        ctx.fast = s.numel() == 0 or bool(s.amin() >= floor)
        if ctx.fast:
            y = s.log_().add_(m)
            bad_index = torch.empty(0, 2, dtype=torch.long, device=x.device)
        else:
            bad_index = (s < floor).any(-1).nonzero()  # rows recomputed with per-node shifts
            y = torch.log(s) + m
            if bad_index.numel() > 0:
                bi, gi = bad_index[:, 0], bad_index[:, 1]
                wg = gi if logw.shape[0] > 1 else torch.zeros_like(gi)
                y[bi, gi] = _exact_rows(x[bi, gi], logw[wg])
        ctx.save_for_backward(x, logw, w, y, m, bad_index)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, logw, w, y, m, bad_index = ctx.saved_tensors
        if ctx.fast:  # every y is finite (or +inf, where exp(m - y) = 0)
            q = (m - y).exp_().mul_(grad_y)
        else:
            finite = torch.isfinite(y)
            # q[b,g,n] = grad * exp(m - y): bounded on fast rows because their sums exceed the floor.
            q = torch.where(finite, grad_y * torch.exp(m - torch.where(finite, y, m)), torch.zeros_like(y))
            if bad_index.numel() > 0:
                q[bad_index[:, 0], bad_index[:, 1]] = 0.0
        chunks = _chunks(x, logw)
        if len(chunks) == 1:
            grad_x, grad_logw = _fast_grads(ctx.needs_input_grad, x, m, w, q)
        else:
            grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
            grad_logw = torch.empty_like(logw) if ctx.needs_input_grad[1] else None
            for c0, cw in chunks:
                gx, gw = _fast_grads(ctx.needs_input_grad, x.narrow(2, c0, cw), m, torch.exp(logw.narrow(2, c0, cw)), q)
                if gx is not None:
                    grad_x.narrow(2, c0, cw).copy_(gx)
                if gw is not None:
                    grad_logw.narrow(2, c0, cw).copy_(gw)
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
