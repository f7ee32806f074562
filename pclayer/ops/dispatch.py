"""The one dispatch point between the torch path and the CUDA kernels.

Every operation of the compiled program that has a hand-written kernel goes through a function
here with a ``backend`` argument: ``"torch"`` always runs the torch path; ``"cuda"`` runs the
kernels or raises :class:`BackendUnavailableError` saying why not; ``"auto"`` (default) picks,
per operation, the route that is never slower: today the torch path for every operation, since
no kernel has been run, let alone timed, on a GPU (the routing table with the argument and the
estimate for each operation is in ``pclayer/cuda/README.md``). ``"auto"`` therefore never
depends on cupy working. Nothing in this module synchronises with the device: argument checks
on CUDA tensors are queued device-side assertions (``torch._assert_async``); where the torch
paths it calls still do, ``pclayer/cuda/README.md`` says so. cupy is imported only when CUDA tensors
arrive (or :func:`backend_info` asks); any failure to import or use it (not installed, no
driver: ``cudaErrorInsufficientDriver``) means the torch path. Every operation takes an
optional ``record``, any object with a ``last_backend`` attribute (a circuit's
:class:`~pclayer.runtime.Runtime`), into which it writes the backend that ran it; there is no
module-level state.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from pclayer.ops.inverse_cdf import inverse_cdf as _torch_inverse_cdf
from pclayer.ops.inverse_cdf import inverse_cdf_weights as _torch_inverse_cdf_weights
from pclayer.ops.log_matmul_exp import log_matmul_exp
from pclayer.ops.masked_logsumexp import masked_logsumexp
from pclayer.ops.max_plus import max_plus as _torch_max_plus
from pclayer.ops.sparse_evidence import categorical_topk_evidence as _torch_topk

Backend = Literal["auto", "torch", "cuda"]
_BACKENDS = ("auto", "torch", "cuda")


class BackendUnavailableError(RuntimeError):
    """``backend="cuda"`` was requested where the CUDA kernels cannot run."""


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """None if cupy can run kernels on this machine, else the reason (probed once, cached)."""
    from pclayer.cuda.cupy_runner import unavailable_reason

    return unavailable_reason()


@functools.cache
def _runner():
    from pclayer.cuda.cupy_runner import CupyRunner

    return CupyRunner()


def _kernel_obstacle(tensors: tuple[torch.Tensor, ...], differentiable: bool) -> str | None:
    from pclayer.cuda.ops import SUPPORTED_DTYPES

    if not differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "this operation has no backward kernel and an input requires grad"
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"}:
        return f"the kernels need CUDA tensors, got tensors on {sorted(devices)}"
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if not dtypes <= set(SUPPORTED_DTYPES):
        return f"the kernels support float32 and float64, got {sorted(map(str, dtypes))}"
    return cuda_unavailable_reason()


def check_backend(backend: object) -> str:
    """``backend`` if it is one of ``"auto"``, ``"torch"``, ``"cuda"``; else a ValueError."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def choose_backend(backend: str, operation: str, tensors: tuple[torch.Tensor, ...], differentiable: bool = True,
                   record: object | None = None) -> str:
    """``"torch"`` or ``"cuda"``: where ``operation`` on ``tensors`` runs for the requested
    ``backend`` (raises :class:`BackendUnavailableError` for ``"cuda"`` where the kernels cannot
    run); written into ``record.last_backend`` when ``record`` is given."""
    check_backend(backend)
    chosen = "torch"
    if backend == "cuda":
        obstacle = _kernel_obstacle(tensors, differentiable)
        if obstacle is not None:
            raise BackendUnavailableError(f"backend='cuda' cannot run {operation}: {obstacle}")
        chosen = "cuda"
    if record is not None:
        record.last_backend = chosen
    return chosen


def backend_info() -> dict[str, object]:
    """What the dispatcher knows: ``cuda_available`` (bool), ``cuda_unavailable_reason``
    (str or None), and ``kernel_sources`` (.cu file -> "fatbin" or "nvrtc" for loaded kernels). Probes cupy (importing it) if that has not happened yet."""
    reason = cuda_unavailable_reason()
    return {
        "cuda_available": reason is None,
        "cuda_unavailable_reason": reason,
        "kernel_sources": dict(_runner().sources) if reason is None else {},
    }


def _check_float(name: str, tensor: torch.Tensor, dim: int) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != dim:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name}: expected a {dim}-d floating tensor, got {shape}")


def sum_dense(x: torch.Tensor, logw: torch.Tensor, backend: Backend = "auto", record: object | None = None) -> torch.Tensor:
    """Dense sum layer ``y[b,g,n] = log sum_c exp(logw[g,n,c] + x[b,g,c])`` (exact).

    Args:
        x: (B, G, C) child log-values.
        logw: (G, N, C) or (1, N, C) log-weights (``-inf`` = no edge; a leading 1 is shared).
        backend: "auto", "torch" or "cuda".

    Returns:
        (B, G, N); differentiable in both arguments (the ``logw`` gradient is the edge flow).
        Also the categorical input layer under full soft evidence, with x = evidence (B, G, K)
        and logw = log-probability table (G|1, n, K).
    """
    _check_dense(x, logw)
    if choose_backend(backend, "sum_dense", (x, logw), record=record) == "cuda":
        from pclayer.cuda import ops

        return ops.sum_dense(_runner(), x, logw)
    return log_matmul_exp(x, logw)


def _check_dense(x: torch.Tensor, logw: torch.Tensor) -> None:
    _check_float("x", x, 3)
    _check_float("logw", logw, 3)
    if logw.shape[0] not in (1, x.shape[1]) or logw.shape[2] != x.shape[2] or logw.dtype != x.dtype:
        raise ValueError(f"logw: expected shape (1 or {x.shape[1]}, N, {x.shape[2]}) and dtype {x.dtype}, "
                         f"got {tuple(logw.shape)} {logw.dtype}")


def max_plus(x: torch.Tensor, logw: torch.Tensor, backend: Backend = "auto", record: object | None = None) -> torch.Tensor:
    """Max-product (MPE) dense sum layer ``y[b,g,n] = max_c logw[g,n,c] + x[b,g,c]``.

    Args:
        x: (B, G, C) child log-values.
        logw: (G, N, C) or (1, N, C) log-weights (``-inf`` = no edge; a leading 1 is shared).
        backend: "auto", "torch" or "cuda".

    Returns:
        (B, G, N), never materialising (B, G, N, C): torch in cache-sized chunks, or the tiled
        max-plus kernel (forward only: with gradients required, "cuda" is an error).
    """
    _check_dense(x, logw)
    if choose_backend(backend, "max_plus", (x, logw), differentiable=False, record=record) == "cuda":
        from pclayer.cuda import ops

        return ops.max_plus_forward(_runner(), x, logw)
    return _torch_max_plus(x, logw)


def logsumexp(a: torch.Tensor, backend: Backend = "auto", record: object | None = None) -> torch.Tensor:
    """Padded (block-sparse) sum layer ``log sum_f exp(a[..., f])``: a (..., F) -> (...).

    ``a`` holds child value + log-weight with ``-inf`` pads; all ``-inf`` rows give ``-inf``
    with zero gradient. Differentiable.
    """
    if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dim() < 1:
        raise ValueError(f"a: expected a floating tensor with at least one dimension, got {getattr(a, 'shape', a)}")
    if choose_backend(backend, "logsumexp", (a,), record=record) == "cuda":
        from pclayer.cuda import ops

        return ops.logsumexp(_runner(), a)
    return masked_logsumexp(a)


def categorical_topk_evidence(values: torch.Tensor, indices: torch.Tensor, log_table: torch.Tensor,
                              backend: Backend = "auto", record: object | None = None) -> torch.Tensor:
    """Categorical input nodes under top-k soft evidence: ``log sum_k theta_n(k) w(k)`` where
    w is given on k categories per row.

    Args:
        values: (B, G, k) log-weights; indices: (B, G, k) int64 categories in [0, K).
        log_table: (G|1, n, K) log-probabilities.

    Returns:
        (B, G, n); differentiable in ``values`` and ``log_table`` (the kernel has a backward).
    """
    _check_float("values", values, 3)
    _check_float("log_table", log_table, 3)
    if indices.dtype != torch.int64 or indices.shape != values.shape:
        raise ValueError(f"indices: expected int64 of shape {tuple(values.shape)}, got {indices.dtype} {tuple(indices.shape)}")
    if log_table.shape[0] not in (1, values.shape[1]) or log_table.dtype != values.dtype:
        raise ValueError(f"log_table: expected shape (1 or {values.shape[1]}, n, K) and dtype {values.dtype}, "
                         f"got {tuple(log_table.shape)} {log_table.dtype}")
    cats = log_table.shape[2]
    if indices.numel():
        _check_async(((indices >= 0) & (indices < cats)).all(), f"indices: expected categories in [0, {cats})")
    if choose_backend(backend, "categorical_topk_evidence", (values, indices, log_table), record=record) == "cuda":
        from pclayer.cuda import ops

        return ops.categorical_topk(_runner(), values, indices, log_table)
    return _torch_topk(values, indices, log_table)


def inverse_cdf(scores: torch.Tensor, uniforms: torch.Tensor, backend: Backend = "auto", record: object | None = None,
                rows: torch.Tensor | None = None, linear: bool = False, overwrite: bool = False,
                addend: torch.Tensor | None = None, addend_rows: torch.Tensor | None = None,
                uniforms_in_range: bool = False) -> torch.Tensor:
    """Top-down sampling choice: index per row of scores (A, C) by inverse CDF with uniforms
    (A,) in [0, 1]. ``scores`` are logits (log-sum representation) or, with ``linear``,
    non-negative weights (scaled representation; the kernel reads their logarithms). With
    ``rows`` (A,) int64, ``scores`` (R, C) is a table and draw ``a`` uses its row ``rows[a]``
    (the choice of ``inverse_cdf(scores[rows], uniforms)``). With logits, ``addend`` (S, C) and
    ``addend_rows`` (A,) int64, draw ``a`` uses ``scores[rows[a]] + addend[addend_rows[a]]``
    (a sum node's log-weights plus its children's values; the kernel gathers and adds in one
    pass). ``overwrite``: ``scores`` may be overwritten (the torch path then works in place).
    Kernel and torch path choose identically except where ``u * total`` lies within a few ulps
    of a CDF boundary (the kernel sums the CDF in a parallel order). ``uniforms_in_range``: the
    caller drew ``uniforms`` with ``torch.rand`` itself, so their range is not checked again.
    Returns (A,) int64."""
    _check_float("scores", scores, 2)
    draws = scores.shape[0] if rows is None else rows.shape[0]
    _check_rows("rows", rows, None)
    if (addend is None) != (addend_rows is None):
        raise ValueError("addend, addend_rows: expected both or neither")
    if addend is not None:
        if linear:
            raise ValueError("addend: only for logits (linear=False)")
        _check_float("addend", addend, 2)
        if addend.shape[1] != scores.shape[1] or addend.dtype != scores.dtype:
            raise ValueError(f"addend: expected (S, {scores.shape[1]}) of dtype {scores.dtype}, got {tuple(addend.shape)} {addend.dtype}")
        _check_rows("addend_rows", addend_rows, draws)
    if not isinstance(uniforms, torch.Tensor) or uniforms.shape != (draws,):
        raise ValueError(f"uniforms: expected shape ({draws},), got {getattr(uniforms, 'shape', uniforms)}")
    if uniforms.numel() and not uniforms_in_range:
        _check_async(((uniforms >= 0) & (uniforms <= 1)).all(), "uniforms: expected values in [0, 1] without NaN")
    if choose_backend(backend, "inverse_cdf", (scores, uniforms), record=record) == "cuda":  # an index has no gradient
        from pclayer.cuda import ops

        table = scores.detach().log() if linear else scores.detach()
        return ops.inverse_cdf(_runner(), table, uniforms, rows, None if addend is None else addend.detach(), addend_rows)
    if addend is not None:
        gathered = scores if rows is None else scores.index_select(0, rows)
        return _torch_inverse_cdf(gathered + addend.index_select(0, addend_rows), uniforms, owned=True)
    return (_torch_inverse_cdf_weights if linear else _torch_inverse_cdf)(scores, uniforms, rows, owned=overwrite)


def _check_rows(name: str, rows: torch.Tensor | None, length: int | None) -> None:
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.dim() != 1 or (
            length is not None and rows.shape[0] != length):
        expected = "a 1-d int64 tensor" + ("" if length is None else f" of length {length}")
        raise ValueError(f"{name}: expected {expected}, got {getattr(rows, 'dtype', type(rows).__name__)} "
                         f"of shape {tuple(getattr(rows, 'shape', ()))}")


def _check_async(condition: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless ``condition`` (a bool scalar tensor) holds. On CUDA the
    check is queued on the stream instead (``torch._assert_async``): a device-side assertion,
    no host synchronisation."""
    if condition.device.type == "cuda":
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)
