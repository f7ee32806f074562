"""Validation and normalisation of query arguments (x, missing, soft_evidence)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pclayer.errors import ZeroProbabilityError


@dataclass
class Evidence:
    """Validated query inputs on the circuit's device.

    Attributes:
        x: (B, V) values; long for all-discrete circuits, the circuit dtype otherwise.
            Missing entries hold 0.
        missing: (B, V) bool or None (nothing missing).
        soft_evidence: (B, V, K) log-weights in the circuit dtype, or None.
    """

    x: torch.Tensor
    missing: torch.Tensor | None
    soft_evidence: torch.Tensor | None


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _describe(value: object) -> str:
    """A tensor's dtype, or the type name of anything else (a numpy array is not a tensor)."""
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on the circuit's device {device}, got {tensor.device}")


def prepare(circuit, x: torch.Tensor, missing: torch.Tensor | None, soft_evidence: torch.Tensor | None) -> Evidence:
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
    elif circuit.has_gaussian:
        raise TypeError(f"x: the circuit has Gaussian variables {(var_cats == 0).nonzero().flatten().tolist()[:10]}; expected a float tensor, got {x.dtype}")
    out_of_range = observed & discrete & ((x < 0) | (x >= var_cats))
    if out_of_range.any():
        b, v = _first_index(out_of_range)
        raise ValueError(f"x: value {x[b, v].item()} at row {b}, variable {v} is out of range [0, {int(var_cats[v])})")
    if circuit.has_gaussian:
        clean = torch.where(observed, x, torch.zeros_like(x)).to(circuit.dtype)
    else:
        clean = torch.where(observed, x, torch.zeros_like(x)).long()
    evidence = None
    if soft_evidence is not None:
        expected = (x.shape[0], num_vars, circuit.num_cats)
        if not isinstance(soft_evidence, torch.Tensor) or not soft_evidence.is_floating_point():
            raise TypeError(f"soft_evidence: expected a float tensor of shape {expected}, got {_describe(soft_evidence)}")
        if tuple(soft_evidence.shape) != expected:
            raise ValueError(f"soft_evidence: expected shape (B, num_vars, num_cats) = {expected}, got {tuple(soft_evidence.shape)}")
        _check_device("soft_evidence", soft_evidence, device)
        if torch.isnan(soft_evidence).any():
            raise ValueError(f"soft_evidence: NaN at {_first_index(torch.isnan(soft_evidence))}")
        if (soft_evidence == torch.inf).any():
            raise ValueError(f"soft_evidence: +inf at {_first_index(soft_evidence == torch.inf)}; expected finite log-weights or -inf")
        if circuit.has_gaussian and (soft_evidence[:, ~discrete] != 0).any():
            raise ValueError("soft_evidence: expected zeros for Gaussian variables (soft evidence applies to discrete ones)")
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
