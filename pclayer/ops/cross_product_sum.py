"""Sums over blocks of cross products (Tucker layers, RAT-SPN) without materialising them.

``out[g, b, n] = sum_{i, j} a[g, b, i] * c[g, b, j] * w[g, i * S2 + j, n]``: per group the
outer product of two factor vectors, contracted with the group's weights. The cross products
are formed a chunk of groups at a time (a few MB, reused), and the backward recomputes them
chunk by chunk instead of saving all of them, so neither pass holds a (G, B, S1*S2) tensor.
"""

from __future__ import annotations

import torch

from pclayer.ops.linear_sums import linear_sums

CHUNK_ELEMENTS = 1 << 20
"""Cross products formed at a time (a few MB: stays in cache and below the allocator's
mmap threshold, so no page faults per chunk)."""


def cross_product_chunk(groups: int, batch: int, cross: int) -> int:
    """Groups per chunk of :func:`cross_product_sum` for ``cross`` = S1*S2 cross products."""
    return min(groups, max(1, CHUNK_ELEMENTS // max(batch * cross, 1)))


def _weights(w: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
    """(g, S1*S2, N) weights of groups ``g0:g1``; a shared (S1*S2, N) table is broadcast."""
    return w.expand(g1 - g0, *w.shape) if w.dim() == 2 else w[g0:g1]


def _forward(a: torch.Tensor, c: torch.Tensor, w: torch.Tensor, crosses: torch.Tensor | None,
             out: torch.Tensor | None) -> torch.Tensor:
    groups, batch, left = a.shape
    right, n = c.shape[2], w.shape[-1]
    step = cross_product_chunk(groups, batch, left * right)
    out = a.new_empty(groups, batch, n) if out is None else out
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        x = torch.mul(a[g0:g1].unsqueeze(-1), c[g0:g1].unsqueeze(-2),
                      out=None if crosses is None else crosses[:g1 - g0])
        linear_sums(x.view(g1 - g0, batch, left * right), w if w.dim() == 2 else w[g0:g1], out=out[g0:g1],
                    groups_first=True)
    return out


class _CrossProductSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(a, c, w)
        step = cross_product_chunk(a.shape[0], a.shape[1], a.shape[2] * c.shape[2])
        return _forward(a, c, w, a.new_empty(step, a.shape[1], a.shape[2], c.shape[2]), None)  # one scratch for all chunks

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        a, c, w = ctx.saved_tensors
        groups, batch, left = a.shape
        right = c.shape[2]
        step = cross_product_chunk(groups, batch, left * right)
        grad = grad.contiguous()
        grad_a = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        grad_c = torch.empty_like(c) if ctx.needs_input_grad[1] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[2] else None
        crosses = a.new_empty(step, batch, left, right)
        grad_x = a.new_empty(step, batch, left * right)
        for g0 in range(0, groups, step):
            g1 = min(groups, g0 + step)
            a_c, c_c, g_c = a[g0:g1].unsqueeze(-1), c[g0:g1].unsqueeze(-2), grad[g0:g1]
            if grad_w is not None:  # recompute the cross products of this chunk
                x = torch.mul(a_c, c_c, out=crosses[:g1 - g0]).view(g1 - g0, batch, left * right)
                if w.dim() == 2:
                    grad_w.addmm_(x.view(-1, left * right).t(), g_c.reshape(-1, g_c.shape[-1]))
                else:
                    torch.bmm(x.transpose(1, 2), g_c, out=grad_w[g0:g1])
            if grad_a is None and grad_c is None:
                continue
            gx = torch.bmm(g_c, _weights(w, g0, g1).transpose(1, 2), out=grad_x[:g1 - g0])
            gx = gx.view(g1 - g0, batch, left, right)
            product = crosses[:g1 - g0]
            if grad_a is not None:
                torch.sum(torch.mul(gx, c_c, out=product), dim=-1, out=grad_a[g0:g1])
            if grad_c is not None:
                torch.sum(torch.mul(gx, a_c, out=product), dim=-2, out=grad_c[g0:g1])
        return grad_a, grad_c, grad_w


def cross_product_sum(a: torch.Tensor, c: torch.Tensor, w: torch.Tensor, *, crosses: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Sums over per-group cross products: (G, B, N).

    Args:
        a: (G, B, S1) left factors, contiguous.
        c: (G, B, S2) right factors, contiguous.
        w: (S1*S2, N) weights shared by every group, or (G, S1*S2, N); cross product
            ``(i, j)`` is row ``i * S2 + j``.
        crosses: optional scratch of at least (chunk, B, S1, S2) for the cross products and
            ``out`` an optional (G, B, N) result buffer; both only without autograd.

    Differentiable in ``a``, ``c`` and ``w``; the backward recomputes the cross products.
    """
    if torch.is_grad_enabled() and (a.requires_grad or c.requires_grad or w.requires_grad):
        return _CrossProductSum.apply(a, c, w)
    return _forward(a, c, w, crosses, out)
