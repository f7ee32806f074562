"""Torch-facing wrappers of the CUDA kernels: shape bookkeeping, output allocation, grids.

Every function takes a ``runner`` that executes one launch: :class:`pclayer.cuda.cupy_runner.CupyRunner`
on a GPU, or the test-only CPU emulator. Inputs are made contiguous (no copy when they already
are); outputs are allocated with torch on the inputs' device. Only float32 and float64 are
supported (:data:`SUPPORTED_DTYPES`). Callers validate shapes (see :mod:`pclayer.ops.dispatch`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

THREADS = 128
"""Threads per block of every launch; equals ``PC_SUM_TILE`` in sum_dense.cu."""

SUPPORTED_DTYPES = (torch.float32, torch.float64)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_MAX_GRID_Y = 65535


class KernelRunner(Protocol):
    """Runs ``kernel`` from the .cu file ``source`` over ``grid`` x ``block`` with ``args``
    (torch tensors for pointers, numpy scalars for values), cupy's calling convention."""

    def __call__(self, source: str, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: tuple) -> None: ...


def _launch(runner: KernelRunner, source: str, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int],
            args: tuple) -> None:
    """Launch with every tensor argument detached: kernels read and write raw memory, and a
    tensor that requires grad cannot be handed to cupy (torch's ``__cuda_array_interface__``
    refuses it, whatever the grad mode; inputs and saved tensors of an autograd Function still
    require grad inside it)."""
    runner(source, kernel, grid, block, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


def _blocks(count: int) -> int:
    return (count + THREADS - 1) // THREADS


def _int32(value: int, name: str) -> np.int32:
    if not 0 <= value < 2**31:
        raise ValueError(f"{name}: {value} does not fit the kernels' 32-bit size arguments")
    return np.int32(value)


def _name(stem: str, dtype: torch.dtype) -> str:
    if dtype not in _SUFFIX:
        raise TypeError(f"dtype: CUDA kernels support float32 and float64, got {dtype}")
    return f"{stem}_{_SUFFIX[dtype]}"


def _dense_operands(x: torch.Tensor, logw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous x (B,G,C) and logw (G|1,N,C) of a dense sum kernel, and its empty (B,G,N) output."""
    x, logw = x.contiguous(), logw.contiguous()
    return x, logw, torch.empty(x.shape[0], x.shape[1], logw.shape[1], dtype=x.dtype, device=x.device)


def sum_dense_forward(runner: KernelRunner, x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """``y[b,g,n] = log sum_c exp(logw[g|0,n,c] + x[b,g,c])``: x (B,G,C), logw (G|1,N,C) -> (B,G,N)."""
    x, logw, y = _dense_operands(x, logw)
    batch, groups, children = x.shape
    nodes = logw.shape[1]
    if y.numel() == 0:
        return y
    if _blocks(nodes) > _MAX_GRID_Y:
        raise ValueError(f"logw: {nodes} nodes per group exceed the kernel grid ({_MAX_GRID_Y * THREADS})")
    _launch(runner, "sum_dense.cu", _name("pc_sum_dense_fwd", x.dtype), (batch * groups, _blocks(nodes), 1), (THREADS, 1, 1),
           (x, logw, y, _int32(groups, "G"), _int32(nodes, "N"), _int32(children, "C"), np.int32(logw.shape[0] == 1)))
    return y


MAX_PLUS_TILE = 32
"""Rows x nodes per block of ``pc_max_plus_fwd_*`` (``PC_MP_TILE``; 16 x 16 threads)."""


def max_plus_forward(runner: KernelRunner, x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """``y[b,g,n] = max_c logw[g|0,n,c] + x[b,g,c]``: x (B,G,C), logw (G|1,N,C) -> (B,G,N)."""
    x, logw, y = _dense_operands(x, logw)
    batch, groups, children = x.shape
    nodes = logw.shape[1]
    if y.numel() == 0:
        return y
    grid = (-(-nodes // MAX_PLUS_TILE), -(-batch // MAX_PLUS_TILE), groups)
    if grid[1] > _MAX_GRID_Y or groups > _MAX_GRID_Y:
        raise ValueError(f"x: {batch} rows and {groups} groups exceed the kernel grid "
                         f"({_MAX_GRID_Y * MAX_PLUS_TILE} rows, {_MAX_GRID_Y} groups)")
    _launch(runner, "max_plus.cu", _name("pc_max_plus_fwd", x.dtype), grid, (16, 16, 1),
            (x, logw, y, _int32(batch, "B"), _int32(groups, "G"), _int32(nodes, "N"), _int32(children, "C"),
             np.int32(logw.shape[0] == 1)))
    return y


def sum_dense_backward(runner: KernelRunner, x: torch.Tensor, logw: torch.Tensor, y: torch.Tensor,
                       grad_y: torch.Tensor, need_x: bool, need_logw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Node flows ``grad_x`` (B,G,C) and parameter flows ``grad_logw`` (G|1,N,C) of
    :func:`sum_dense_forward` (each None when not needed); terms with non-finite y are zero."""
    x, logw, y, grad_y = x.contiguous(), logw.contiguous(), y.contiguous(), grad_y.contiguous()
    batch, groups, children = x.shape
    weight_groups, nodes, _ = logw.shape
    grad_x = grad_logw = None
    if need_x:
        grad_x = torch.zeros_like(x)
        if x.numel() and nodes:
            _launch(runner, "sum_dense.cu", _name("pc_sum_dense_grad_x", x.dtype), (_blocks(x.numel()), 1, 1), (THREADS, 1, 1),
                   (x, logw, y, grad_y, grad_x, np.int64(batch * groups), _int32(groups, "G"), _int32(nodes, "N"),
                    _int32(children, "C"), np.int32(weight_groups == 1)))
    if need_logw:
        grad_logw = torch.zeros_like(logw)
        if logw.numel() and batch * groups:
            _launch(runner, "sum_dense.cu", _name("pc_sum_dense_grad_logw", x.dtype), (_blocks(logw.numel()), 1, 1),
                   (THREADS, 1, 1), (x, logw, y, grad_y, grad_logw, _int32(batch, "B"), _int32(groups, "G"),
                                     _int32(weight_groups, "Gw"), _int32(nodes, "N"), _int32(children, "C")))
    return grad_x, grad_logw


def logsumexp_forward(runner: KernelRunner, a: torch.Tensor) -> torch.Tensor:
    """``log sum_f exp(a[..., f])``: a (..., F) -> (...); all ``-inf`` rows give ``-inf``."""
    a = a.contiguous()
    width = a.shape[-1]
    y = torch.empty(a.shape[:-1], dtype=a.dtype, device=a.device)
    if y.numel():
        _launch(runner, "logsumexp_rows.cu", _name("pc_logsumexp_rows_fwd", a.dtype), (_blocks(y.numel()), 1, 1),
               (THREADS, 1, 1), (a, y, np.int64(y.numel()), _int32(width, "F")))
    return y


def logsumexp_backward(runner: KernelRunner, a: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """``grad_a = grad_y exp(a - y)`` (zero where y is not finite): a (..., F) -> (..., F)."""
    a, y, grad_y = a.contiguous(), y.contiguous(), grad_y.contiguous()
    grad_a = torch.empty_like(a)
    if a.numel():
        _launch(runner, "logsumexp_rows.cu", _name("pc_logsumexp_rows_bwd", a.dtype), (_blocks(a.numel()), 1, 1),
               (THREADS, 1, 1), (a, y, grad_y, grad_a, np.int64(y.numel()), _int32(a.shape[-1], "F")))
    return grad_a


TOPK_THREADS = 128
"""Nodes per block of the top-k evidence kernels (``PC_TOPK_THREADS``)."""


def categorical_topk_forward(runner: KernelRunner, values: torch.Tensor, indices: torch.Tensor,
                             log_table_t: torch.Tensor) -> torch.Tensor:
    """``y[b,g,n] = log sum_j exp(values[b,g,j] + log_table_t[g|0,indices[b,g,j],n])``:
    values, indices (B,G,k), the transposed log-table (G|1,K,n) -> (B,G,n). Indices must lie in [0, K)."""
    values, indices, log_table_t = values.contiguous(), indices.contiguous(), log_table_t.contiguous()
    batch, groups, k = values.shape
    table_groups, cats, nodes = log_table_t.shape
    y = torch.empty(batch, groups, nodes, dtype=values.dtype, device=values.device)
    if y.numel():
        _launch(runner, "categorical_topk.cu", _name("pc_categorical_topk_fwd", values.dtype), _topk_grid(batch * groups, nodes),
                (TOPK_THREADS, 1, 1), (values, indices, log_table_t, y, _int32(groups, "G"), _int32(k, "k"),
                                       _int32(nodes, "n"), _int32(cats, "K"), np.int32(table_groups == 1)))
    return y


def categorical_topk_backward(runner: KernelRunner, values: torch.Tensor, indices: torch.Tensor, log_table_t: torch.Tensor,
                              y: torch.Tensor, grad_y: torch.Tensor, need_values: bool,
                              need_table: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flows of :func:`categorical_topk_forward`: ``grad_values`` (B,G,k) and ``grad_table_t``
    (G|1,K,n) (zeros where not needed); terms with non-finite y are zero."""
    values, indices, log_table_t = values.contiguous(), indices.contiguous(), log_table_t.contiguous()
    y, grad_y = y.contiguous(), grad_y.contiguous()
    batch, groups, k = values.shape
    table_groups, cats, nodes = log_table_t.shape
    grad_values, grad_table_t = torch.zeros_like(values), torch.zeros_like(log_table_t)
    if y.numel() and k and (need_values or need_table):
        _launch(runner, "categorical_topk.cu", _name("pc_categorical_topk_bwd", values.dtype), _topk_grid(batch * groups, nodes),
                (TOPK_THREADS, 1, 1), (values, indices, log_table_t, y, grad_y, grad_values, grad_table_t,
                                       _int32(groups, "G"), _int32(k, "k"), _int32(nodes, "n"), _int32(cats, "K"),
                                       np.int32(table_groups == 1), np.int32(need_values), np.int32(need_table)))
    return grad_values, grad_table_t


def _topk_grid(rows: int, nodes: int) -> tuple[int, int, int]:
    node_blocks = -(-nodes // TOPK_THREADS)
    if node_blocks > _MAX_GRID_Y:
        raise ValueError(f"log_table: {nodes} nodes exceed the kernel grid ({_MAX_GRID_Y * TOPK_THREADS})")
    return rows, node_blocks, 1


CDF_WARP_ROWS = 4
"""Rows (one warp each) per block of ``pc_inverse_cdf_warp_*``."""
CDF_WARP_MAX_C = 4096
"""Longest row ``pc_inverse_cdf_warp_*`` takes (a warp per row); longer rows take a block each."""
CDF_BLOCK = 1024
"""Threads per block of ``pc_inverse_cdf_block_*`` (one block per row)."""
CDF_BLOCK_MAX_C = 1024 * 4 * 4096
"""Longest row ``pc_inverse_cdf_block_*`` takes (4096 tiles of 4096 elements in shared memory)."""


def inverse_cdf(runner: KernelRunner, table: torch.Tensor, uniforms: torch.Tensor, rows: torch.Tensor | None = None,
                addend: torch.Tensor | None = None, addend_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Index per draw ``a`` from softmax of the row ``table[rows[a]] + addend[addend_rows[a]]``
    by inverse CDF with ``uniforms[a]``: table (R, C), uniforms (A,), rows / addend_rows (A,)
    int64 (None: ``rows`` = 0..A-1, no addend), addend (S, C) -> (A,) int64. The gather and
    the addition happen in the kernel: a warp per row up to :data:`CDF_WARP_MAX_C` columns, a
    block per row beyond."""
    table, uniforms = table.contiguous(), uniforms.to(table.dtype).contiguous()
    draws, width = uniforms.shape[0], table.shape[1]
    out = torch.empty(draws, dtype=torch.int64, device=table.device)
    if not draws:
        return out
    if width > CDF_BLOCK_MAX_C:
        raise ValueError(f"logits: rows of {width} categories exceed the sampling kernel's {CDF_BLOCK_MAX_C}")
    rows = torch.arange(draws, device=table.device) if rows is None else rows.contiguous()
    has_addend = addend is not None
    addend, addend_rows = (addend.contiguous(), addend_rows.contiguous()) if has_addend else (table, rows)
    if width <= CDF_WARP_MAX_C:
        kernel, grid, block = "pc_inverse_cdf_warp", (-(-draws // CDF_WARP_ROWS), 1, 1), (32 * CDF_WARP_ROWS, 1, 1)
    else:
        kernel, grid, block = "pc_inverse_cdf_block", (draws, 1, 1), (CDF_BLOCK, 1, 1)
    _launch(runner, "inverse_cdf.cu", _name(kernel, table.dtype), grid, block,
            (table, rows, addend, addend_rows, np.int32(has_addend), uniforms, out, np.int64(draws), _int32(width, "C")))
    return out


class _SumDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, logw: torch.Tensor, runner: KernelRunner) -> torch.Tensor:  # type: ignore[override]
        y = sum_dense_forward(runner, x, logw)
        ctx.runner = runner
        ctx.save_for_backward(x, logw, y)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, logw, y = ctx.saved_tensors
        grad_x, grad_logw = sum_dense_backward(ctx.runner, x, logw, y, grad_y, ctx.needs_input_grad[0],
                                               ctx.needs_input_grad[1])
        return grad_x, grad_logw, None


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, runner: KernelRunner) -> torch.Tensor:  # type: ignore[override]
        y = logsumexp_forward(runner, a)
        ctx.runner = runner
        ctx.save_for_backward(a, y)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        a, y = ctx.saved_tensors
        return logsumexp_backward(ctx.runner, a, y, grad_y), None


class _CategoricalTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, log_table: torch.Tensor,  # type: ignore[override]
                runner: KernelRunner) -> torch.Tensor:
        log_table_t = log_table.detach().transpose(1, 2).contiguous()  # one copy, shared with backward
        y = categorical_topk_forward(runner, values, indices, log_table_t)
        ctx.runner = runner
        ctx.save_for_backward(values, indices, log_table_t, y)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        values, indices, log_table_t, y = ctx.saved_tensors
        grad_values, grad_table_t = categorical_topk_backward(ctx.runner, values, indices, log_table_t, y, grad_y,
                                                              ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return grad_values, None, grad_table_t.transpose(1, 2), None


def categorical_topk(runner: KernelRunner, values: torch.Tensor, indices: torch.Tensor,
                     log_table: torch.Tensor) -> torch.Tensor:
    """Differentiable top-k evidence with a (G|1,n,K) log-table, read by the kernels as its
    transposed (G|1,K,n) copy; backward runs the flow kernel (parameter flows for EM)."""
    return _CategoricalTopK.apply(values, indices, log_table, runner)


def sum_dense(runner: KernelRunner, x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`sum_dense_forward`; backward runs the flow kernels."""
    return _SumDense.apply(x, logw, runner)


def logsumexp(runner: KernelRunner, a: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`logsumexp_forward`; backward runs the flow kernel."""
    return _LogSumExp.apply(a, runner)
