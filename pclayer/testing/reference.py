"""Reference answers to every query, exact in float64, walking the *symbolic* circuit.

Nothing here uses the compiled program: :func:`log_prob` evaluates the node groups one by
one in log space with numpy (inputs marginalised where a value is missing, as exactness of
smooth decomposable circuits allows); :func:`distribution` enumerates every joint
assignment; :func:`posterior` clamps one missing variable at a time; :func:`mpe`
enumerates the completions of the missing values. Arguments mean what they mean for the
queries of :class:`pclayer.TensorCircuit`:

* ``x``: (B, V) values (entries that are missing are ignored);
* ``missing``: (B, V) bool, True = summed out (default: nothing missing);
* ``soft_evidence``: (B, V, K) log-weights ``w``; the weighted value of an assignment is
  ``p(x) * prod_i exp(w[b, i, x_i])`` over all discrete variables (observed ones contribute
  the weight of their value). Gaussian variables ignore soft evidence.

``circuit`` is the root group of a symbolic circuit or a :class:`pclayer.inspection.CircuitView`
(``describe(root, compiled)`` evaluates a compiled circuit's current, e.g. trained, parameters).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from pclayer.inspection import CircuitView, GroupView, describe
from pclayer.nodes import NodeGroup

#: Largest number of assignments :func:`distribution` and :func:`mpe` enumerate.
MAX_ENUMERATION = 2**20


def _view(circuit: NodeGroup | CircuitView) -> CircuitView:
    if isinstance(circuit, CircuitView):
        return circuit
    if isinstance(circuit, NodeGroup):
        return describe(circuit)
    raise TypeError(f"circuit: expected a root node group or a pclayer.inspection.CircuitView, got {type(circuit).__name__}")


def _numpy(value: object, name: str, dtype: type) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if dtype is bool and array.dtype != np.bool_:
        raise TypeError(f"{name}: expected a boolean array, got dtype {array.dtype}")
    return array.astype(dtype)


def _arguments(view: CircuitView, x: object, missing: object | None, soft_evidence: object | None):
    xs = _numpy(x, "x", np.float64)
    if xs.ndim != 2 or xs.shape[1] != view.num_vars:
        raise ValueError(f"x: expected shape (B, {view.num_vars}), got {xs.shape}")
    miss = np.zeros(xs.shape, dtype=bool) if missing is None else _numpy(missing, "missing", bool)
    if miss.shape != xs.shape:
        raise ValueError(f"missing: expected shape {xs.shape} (same as x), got {miss.shape}")
    soft = None
    if soft_evidence is not None:
        soft = _numpy(soft_evidence, "soft_evidence", np.float64)
        k = max(view.var_cats)
        if soft.ndim != 3 or soft.shape[:2] != xs.shape or soft.shape[2] < k:
            raise ValueError(f"soft_evidence: expected shape ({xs.shape[0]}, {view.num_vars}, {k}), got {soft.shape}")
    for v, cats in enumerate(view.var_cats):
        if cats:
            column = xs[~miss[:, v], v]
            if np.any((column < 0) | (column >= cats) | (column != np.round(column))):
                raise ValueError(f"x: variable {v} takes values in 0..{cats - 1}, got {column[(column < 0) | (column >= cats)][:5]}")
    return xs, miss, soft


def _reduce(values: np.ndarray, axis: int, max_product: bool) -> np.ndarray:
    """log-sum-exp (or max) of log-values along ``axis``; -inf for all -inf."""
    top = np.max(values, axis=axis, keepdims=True)
    if max_product:
        return np.squeeze(top, axis=axis)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(np.sum(np.exp(values - shift), axis=axis, keepdims=True)) + shift, axis=axis)


def _log(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(values)


def _input_log_values(group: GroupView, xs: np.ndarray, miss: np.ndarray, soft: np.ndarray | None,
                      max_product: bool) -> np.ndarray:
    """(B, num_nodes) log-values of an input group."""
    column, absent = xs[:, group.var], miss[:, group.var]
    params = {key: value.numpy() for key, value in group.params.items()}
    kind = group.distribution.kind
    if kind == "gaussian":
        mean, std = params["mean"], params["std"]
        z = (np.where(absent, 0.0, column)[:, None] - mean[None]) / std[None]
        observed = -0.5 * z * z - np.log(std)[None] - 0.5 * math.log(2 * math.pi)
        summed_out = (-np.log(std) - 0.5 * math.log(2 * math.pi)) if max_product else np.zeros_like(std)
        return np.where(absent[:, None], summed_out[None], observed)
    if kind == "indicator":
        k = group.distribution.num_cats
        table = np.where(np.arange(k)[None] == params["values"][:, None], 0.0, -np.inf)
    elif kind == "bernoulli":
        table = _log(np.stack([1 - params["p"], params["p"]], axis=-1))
    elif kind == "binomial":
        trials, p = group.distribution.n, params["p"][:, None]
        k = np.arange(trials + 1)[None]
        coefficients = np.array([math.lgamma(trials + 1) - math.lgamma(v + 1) - math.lgamma(trials - v + 1)
                                 for v in range(trials + 1)])[None]
        table = coefficients + k * _log(p) + (trials - k) * _log(1 - p)
    elif "probs" in params:
        table = _log(params["probs"])
    else:  # any other table-based distribution, read from its compiled normalised table
        table = _log(params["table"])
    k = table.shape[1]
    weights = np.zeros((len(xs), k)) if soft is None else soft[:, group.var, :k]
    weighted = table[None] + weights[:, None, :]  # (B, n, K)
    index = np.where(absent, 0, column).astype(np.int64)
    observed = np.take_along_axis(weighted, np.broadcast_to(index[:, None, None], (len(xs), group.num_nodes, 1)), 2)[..., 0]
    return np.where(absent[:, None], _reduce(weighted, 2, max_product), observed)


def _root_log_values(view: CircuitView, xs: np.ndarray, miss: np.ndarray, soft: np.ndarray | None,
                     max_product: bool) -> np.ndarray:
    values: list[np.ndarray] = []
    for group in view.groups:
        if group.kind == "input":
            out = _input_log_values(group, xs, miss, soft, max_product)
        elif group.kind == "product":
            edges = group.edges.numpy()
            out = np.zeros((len(xs), group.num_nodes))
            for i, child in enumerate(group.children):
                out = out + values[child][:, edges[:, i]]
        else:
            stacked = np.concatenate([values[child] for child in group.children], axis=1)  # (B, C)
            log_w = _log(group.params["weights"].numpy())  # (n, C)
            out = _reduce(stacked[:, None, :] + log_w[None], 2, max_product)
        values.append(out)
    return values[-1][:, 0]


def log_prob(circuit: NodeGroup | CircuitView, x: object, missing: object | None = None,
             soft_evidence: object | None = None, *, max_product: bool = False) -> np.ndarray:
    """(B,) ``log sum_{missing} p(x) * prod_i exp(w[b, i, x_i])``, the answer of
    ``TensorCircuit.log_prob``; ``-inf`` for evidence of probability zero.

    With ``max_product`` every sum (over the children of sum nodes and over the values of
    missing variables) is a max: the log-value of the best joint assignment of the missing
    variables and the latent choices, which is what ``TensorCircuit.mpe`` maximises.
    """
    view = _view(circuit)
    xs, miss, soft = _arguments(view, x, missing, soft_evidence)
    return _root_log_values(view, xs, miss, soft, max_product)


def all_assignments(var_cats: list[int] | tuple[int, ...]) -> np.ndarray:
    """(prod(var_cats), V) every joint assignment, in C order (last variable fastest)."""
    rows = list(itertools.product(*[range(k) for k in var_cats]))
    return np.array(rows, dtype=np.int64).reshape(len(rows), len(var_cats))


def distribution(circuit: NodeGroup | CircuitView) -> tuple[np.ndarray, np.ndarray]:
    """The whole joint of a small discrete circuit: ``(assignments (A, V), probabilities (A,))``
    with assignments in C order (last variable fastest) and probabilities summing to one.

    Raises:
        ValueError: Gaussian variables, or more than :data:`MAX_ENUMERATION` assignments.
    """
    view = _view(circuit)
    if 0 in view.var_cats:
        raise ValueError("circuit: distribution needs discrete variables only; this circuit has Gaussian ones")
    size = math.prod(view.var_cats)
    if size > MAX_ENUMERATION:
        raise ValueError(f"circuit: has {size} joint assignments, more than the {MAX_ENUMERATION} distribution enumerates")
    assignments = all_assignments(view.var_cats)
    return assignments, np.exp(log_prob(view, assignments))


def posterior(circuit: NodeGroup | CircuitView, x: object, missing: object | None = None,
              soft_evidence: object | None = None) -> np.ndarray:
    """(B, V, K) ``p(x_i = k | evidence)`` under the weighted distribution (K = the largest
    category count), the answer of ``TensorCircuit.posterior``: one-hot at observed
    variables, zeros beyond a variable's categories, NaN rows where the evidence has
    probability zero. Discrete circuits only."""
    view = _view(circuit)
    if 0 in view.var_cats:
        raise ValueError("circuit: posterior is defined for discrete variables only; this circuit has Gaussian ones")
    xs, miss, soft = _arguments(view, x, missing, soft_evidence)
    k_max = max(view.var_cats)
    log_z = _root_log_values(view, xs, miss, soft, False)
    out = np.zeros((len(xs), view.num_vars, k_max))
    for v, cats in enumerate(view.var_cats):
        for k in range(cats):
            clamped_x, clamped_miss = xs.copy(), miss.copy()
            clamped_x[:, v], clamped_miss[:, v] = k, False
            with np.errstate(invalid="ignore"):
                out[:, v, k] = np.exp(_root_log_values(view, clamped_x, clamped_miss, soft, False) - log_z)
    observed = ~miss
    rows, cols = np.nonzero(observed)
    out[rows, cols] = 0.0
    out[rows, cols, xs[rows, cols].astype(np.int64)] = 1.0
    out[~np.isfinite(log_z)] = np.nan
    return out


class MPEResult(NamedTuple):
    """Answer of :func:`mpe`.

    Attributes:
        x: (B, V) the evidence with every missing value decoded.
        log_value: (B,) the max-product log-value of the decoding (``-inf`` where the
            evidence has probability zero; the decoding is then arbitrary).
    """

    x: np.ndarray
    log_value: np.ndarray


def mpe(circuit: NodeGroup | CircuitView, x: object, missing: object | None = None,
        soft_evidence: object | None = None) -> MPEResult:
    """Max-product decoding by enumeration, the answer of ``TensorCircuit.mpe``: per row, the
    completion of the missing (discrete) values whose :func:`log_prob` with ``max_product``
    is largest (the first in C order among ties).

    Raises:
        ValueError: a row has more than :data:`MAX_ENUMERATION` completions, or a Gaussian
            variable is missing.
    """
    view = _view(circuit)
    xs, miss, soft = _arguments(view, x, missing, soft_evidence)
    decoded, best = xs.copy(), np.full(len(xs), -np.inf)
    for b in range(len(xs)):
        free = np.nonzero(miss[b])[0]
        if any(view.var_cats[v] == 0 for v in free):
            raise ValueError(f"missing: row {b} leaves a Gaussian variable missing; mpe enumerates discrete values only")
        count = math.prod(view.var_cats[v] for v in free)
        if count > MAX_ENUMERATION:
            raise ValueError(f"missing: row {b} has {count} completions, more than the {MAX_ENUMERATION} mpe enumerates")
        completions = np.repeat(xs[b:b + 1], count, axis=0)
        completions[:, free] = all_assignments([view.var_cats[v] for v in free])
        row_soft = None if soft is None else np.repeat(soft[b:b + 1], count, axis=0)
        values = _root_log_values(view, completions, np.zeros_like(completions, dtype=bool), row_soft, True)
        pick = int(np.argmax(values))
        decoded[b], best[b] = completions[pick], values[pick]
    return MPEResult(decoded if 0 in view.var_cats else decoded.astype(np.int64), best)
