"""The sum-node formula of the scaled representation: child probabilities times weights.

Every scaled sum over dense children, plain (:meth:`pclayer.representations.Scaled.sum_dense`)
or over fused cross products (:func:`pclayer.ops.cross_product_sum`), is this function: one
matrix product per weight bank, written into one output.
"""

from __future__ import annotations

import torch


def linear_sums(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                groups_first: bool = False) -> torch.Tensor:
    """``y[g, n] = sum_c x[g, c] * w[g, c, n]`` for every batch row and group.

    Args:
        x: (B, G, C) children's probabilities, or (G, B, C) with ``groups_first``.
        w: (C, N) weights shared by every group, or (G, C, N).
        out: optional result buffer of the returned shape (only without autograd).
        groups_first: the layout of ``x`` and of the result.

    Returns:
        (B, G*N), or (G, B, N) with ``groups_first``. Differentiable in ``x`` and ``w``.
    """
    n = w.shape[-1]
    if groups_first:
        g, b, c = x.shape
        if w.dim() == 2:
            return torch.mm(x.reshape(g * b, c), w, out=None if out is None else out.view(g * b, n)).view(g, b, n)
        return torch.bmm(x, w, out=out)
    b, g, c = x.shape
    if w.dim() == 2:
        return torch.mm(x.reshape(b * g, c) if g > 1 else x.view(b, c), w,
                        out=None if out is None else out.view(b * g, n)).view(b, g * n)
    if out is None and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _GroupProducts.apply(x, w)
    return _group_products(x, w, out)


def _group_products(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[:, g*N:(g+1)*N] = x[:, g] @ w[g]`` for x (B, G, C) and w (G, C, N): one product
    per group written in place into the (B, G*N) output (no transposed copies, no join)."""
    b, g, _ = x.shape
    n = w.shape[2]
    out = x.new_empty(b, g * n) if out is None else out
    for group in range(g):
        torch.mm(x[:, group], w[group], out=out[:, group * n:(group + 1) * n])
    return out


class _GroupProducts(torch.autograd.Function):
    """:func:`_group_products` under autograd, with a backward of the same per-group products
    (autograd through a join of per-group results would add a copy per pass and per group)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return _group_products(x, w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        b, g, c = x.shape
        n = w.shape[2]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(b, g, c)
            for group in range(g):
                torch.mm(grad[:, group * n:(group + 1) * n], w[group].t(), out=grad_x[:, group])
        if ctx.needs_input_grad[1]:
            grad_w = w.new_empty(g, c, n)
            for group in range(g):
                torch.mm(x[:, group].t(), grad[:, group * n:(group + 1) * n], out=grad_w[group])
        return grad_x, grad_w
