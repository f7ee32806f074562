"""Validation and normalisation of query arguments (x, missing, soft_evidence)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pclayer.errors import ZeroProbabilityError
from pclayer.topk import TopKEvidence


@dataclass
class Evidence:
    """Validated query inputs on the circuit's device.

    Attributes:
        x: (B, V) values; long for all-discrete circuits, the circuit dtype otherwise.
            Missing entries hold 0.
        missing: (B, V) bool or None (nothing missing).
        soft_evidence: (B, V, K) log-weights in the circuit dtype, a :class:`TopKEvidence`
            (values in the circuit dtype, candidates sorted by category), or None.
    """

    x: torch.Tensor
    missing: torch.Tensor | None
    soft_evidence: torch.Tensor | TopKEvidence | None


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _describe(value: object) -> str:
    """A tensor's dtype, or the type name of anything else (a numpy array is not a tensor)."""
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_log_weights(name: str, weights: torch.Tensor) -> None:
    top = weights.detach().amax() if weights.numel() else None  # NaN if any entry is NaN: one pass
    if top is None or bool(top < torch.inf):
        return
    if torch.isnan(weights).any():
        raise ValueError(f"{name}: NaN at {_first_index(torch.isnan(weights))}")
    raise ValueError(f"{name}: +inf at {_first_index(weights == torch.inf)}; expected finite log-weights or -inf")


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on the circuit's device {device}, got {tensor.device}")


def prepare_topk(circuit, evidence: TopKEvidence, batch: int) -> TopKEvidence:
    """Check a :class:`TopKEvidence` against the circuit (shapes, dtypes, devices, NaN/+inf,
    index range per variable, no repeated candidate) and return it in the circuit dtype with
    each variable's candidates sorted by category (so draws match the dense evidence's)."""
    num_vars, device = circuit.num_vars, circuit.device
    values, indices, free = evidence.values, evidence.indices, evidence.free
    if circuit.has_continuous:
        raise ValueError("soft_evidence: TopKEvidence needs an all-discrete circuit; this one has continuous variables")
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"soft_evidence.values: expected a float tensor of shape (B, {num_vars}, k), got {_describe(values)}")
    if values.ndim != 3 or values.shape[:2] != (batch, num_vars) or values.shape[2] < 1:
        raise ValueError(f"soft_evidence.values: expected shape (B, num_vars, k) = ({batch}, {num_vars}, k >= 1), got {tuple(values.shape)}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError(f"soft_evidence.indices: expected an int64 tensor of shape {tuple(values.shape)}, got {_describe(indices)}")
    if indices.shape != values.shape:
        raise ValueError(f"soft_evidence.indices: expected shape {tuple(values.shape)} (same as values), got {tuple(indices.shape)}")
    _check_device("soft_evidence.values", values, device)
    _check_device("soft_evidence.indices", indices, device)
    if free is not None:
        if not isinstance(free, torch.Tensor) or free.dtype != torch.bool:
            raise TypeError(f"soft_evidence.free: expected a bool tensor of shape ({batch}, {num_vars}), got {_describe(free)}")
        if tuple(free.shape) != (batch, num_vars):
            raise ValueError(f"soft_evidence.free: expected shape ({batch}, {num_vars}), got {tuple(free.shape)}")
        _check_device("soft_evidence.free", free, device)
    _check_log_weights("soft_evidence.values", values)
    limit = circuit.var_cats.view(1, -1, 1)
    bad = (indices < 0) | (indices >= limit)
    if bad.any():
        b, i, j = _first_index(bad)
        raise ValueError(f"soft_evidence.indices: category {int(indices[b, i, j])} at {(b, i, j)} is out of range "
                         f"[0, {int(circuit.var_cats[i])}) of variable {i}")
    order = indices.argsort(dim=-1)
    indices = indices.gather(-1, order)
    repeated = indices[..., 1:] == indices[..., :-1]
    if repeated.any():
        b, i, j = _first_index(repeated)
        raise ValueError(f"soft_evidence.indices: category {int(indices[b, i, j])} is listed twice for row {b}, variable {i}; "
                         "expected distinct candidates")
    return TopKEvidence(values.gather(-1, order).to(circuit.dtype), indices, free)


def prepare(circuit, x: torch.Tensor, missing: torch.Tensor | None,
            soft_evidence: torch.Tensor | TopKEvidence | None) -> Evidence:
    """Check shapes, dtypes, ranges, NaN and devices of query arguments.

    Raises ``TypeError``/``ValueError`` naming the argument and what was expected.
    """
    num_vars, device = circuit.num_vars, circuit.device
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (B, {num_vars}), got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != num_vars:
        raise ValueError(f"x: expected shape (B, {num_vars}), got {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or not x.dtype.is_signed or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"x: expected an integer or float tensor, got {x.dtype}")
    _check_device("x", x, device)
    if missing is not None:
        if not isinstance(missing, torch.Tensor) or missing.dtype != torch.bool:
            raise TypeError(f"missing: expected a bool tensor of shape {tuple(x.shape)}, got {_describe(missing)}")
        if missing.shape != x.shape:
            raise ValueError(f"missing: expected shape {tuple(x.shape)} (same as x), got {tuple(missing.shape)}")
        _check_device("missing", missing, device)
    observed = ~missing if missing is not None else torch.ones_like(x, dtype=torch.bool)
    var_cats = circuit.var_cats
    discrete = var_cats > 0
    if x.is_floating_point():
        nan = torch.isnan(x) & observed
        if nan.any():
            raise ValueError(f"x: NaN at observed entry {_first_index(nan)}; mark missing entries with missing=True")
        infinite = torch.isinf(x) & observed
        if infinite.any():
            raise ValueError(f"x: infinite value at observed entry {_first_index(infinite)}; expected finite values")
        bad = observed & discrete & (x != torch.round(x))
        if bad.any():
            raise ValueError(f"x: expected integer category values for discrete variables, got {x[_first_index(bad)].item()} at {_first_index(bad)}")
    elif circuit.has_continuous:
        raise TypeError(f"x: the circuit has continuous variables {(var_cats == 0).nonzero().flatten().tolist()[:10]}; expected a float tensor, got {x.dtype}")
    out_of_range = observed & discrete & ((x < 0) | (x >= var_cats))
    if out_of_range.any():
        b, v = _first_index(out_of_range)
        raise ValueError(f"x: value {x[b, v].item()} at row {b}, variable {v} is out of range [0, {int(var_cats[v])})")
    if circuit.has_continuous:
        clean = torch.where(observed, x, torch.zeros_like(x)).to(circuit.dtype)
    else:
        clean = torch.where(observed, x, torch.zeros_like(x)).long()
    evidence = None
    if isinstance(soft_evidence, TopKEvidence):
        evidence = prepare_topk(circuit, soft_evidence, x.shape[0])
    elif soft_evidence is not None:
        expected = (x.shape[0], num_vars, circuit.num_cats)
        if not isinstance(soft_evidence, torch.Tensor) or not soft_evidence.is_floating_point():
            raise TypeError(f"soft_evidence: expected a float tensor of shape {expected}, got {_describe(soft_evidence)} (or pass a pclayer.TopKEvidence)")
        if tuple(soft_evidence.shape) != expected:
            raise ValueError(f"soft_evidence: expected shape (B, num_vars, num_cats) = {expected}, got {tuple(soft_evidence.shape)}")
        _check_device("soft_evidence", soft_evidence, device)
        _check_log_weights("soft_evidence", soft_evidence)
        if circuit.has_continuous and (soft_evidence[:, ~discrete] != 0).any():
            raise ValueError("soft_evidence: expected zeros for continuous variables (soft evidence applies to discrete ones)")
        evidence = soft_evidence.to(circuit.dtype)
    if missing is not None and not missing.any():
        missing = None
    return Evidence(clean, missing, evidence)


def require_positive(log_z: torch.Tensor, query: str) -> None:
    """Raise :class:`ZeroProbabilityError` if any row's evidence has probability zero."""
    zero = ~torch.isfinite(log_z)
    if zero.any():
        rows = zero.nonzero().flatten().tolist()
        raise ZeroProbabilityError(f"{query}: the evidence of rows {rows[:10]} has probability zero (log_prob = -inf); the conditional distribution is undefined")
