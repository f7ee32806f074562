"""Hidden Markov models answered by textbook dynamic programming, in float64 numpy.

An independent reference for :func:`pclayer.structures.hmm`: the forward algorithm, clamped
posteriors and Viterbi, for ``p(x) = sum_z initial[z_0] prod_t transition[z_t, z_{t+1}]
prod_t emission[z_t, x_t]``. Shapes: ``initial`` (H,), ``transition`` (H, H) or (T-1, H, H)
with rows = from-state, ``emission`` (H, K) or (T, H, K), ``x`` (T,), ``missing`` (T,) bool,
``soft`` (T, K) log-weights multiplied into the distribution as ``exp(w[t, x_t])``.
"""

from __future__ import annotations

import math

import numpy as np

from pclayer.testing.reference import _log, _reduce


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    return _reduce(a, axis, max_product=False)


def _transition(trans: np.ndarray, t: int) -> np.ndarray:
    return trans[t] if trans.ndim == 3 else trans


def _emission(emit: np.ndarray, t: int) -> np.ndarray:
    return emit[t] if emit.ndim == 3 else emit


def _log_emission(emit: np.ndarray, x: np.ndarray, missing: np.ndarray | None, soft: np.ndarray | None,
                     t: int, reduce) -> np.ndarray:
    """(H,) log of emission[z, x_t] * exp(w[t, x_t]); a missing x_t is reduced over k by ``reduce``."""
    log_e = _log(_emission(emit, t))  # (H, K)
    k = log_e.shape[1]
    weights = soft[t, :k] if soft is not None else np.zeros(k)
    if missing is not None and missing[t]:
        return reduce(log_e + weights[None], 1)
    return log_e[:, x[t]] + weights[x[t]]


def forward(init, trans, emit, x, missing=None, soft=None) -> float:
    """log sum_{z, missing x} p(z, x) * prod_t exp(w[t, x_t]) by the forward algorithm in log space.

    init (H,), trans (H, H) or (T-1, H, H) with rows = from-state, emit (H, K) or (T, H, K),
    x (T,), missing (T,) bool, soft (T, K) log-weights.
    """
    length = len(x)
    alpha = _log(init) + _log_emission(emit, x, missing, soft, 0, _logsumexp)
    for t in range(1, length):
        alpha = _logsumexp(alpha[:, None] + _log(_transition(trans, t - 1)), 0)
        alpha = alpha + _log_emission(emit, x, missing, soft, t, _logsumexp)
    return float(_logsumexp(alpha, 0))


def posterior(init, trans, emit, x, missing, soft=None) -> np.ndarray:
    """(T, K) p(x_t = k | evidence), by clamping each missing variable in turn."""
    k = _emission(emit, 0).shape[1]
    log_z = forward(init, trans, emit, x, missing, soft)
    out = np.zeros((len(x), k))
    for t in range(len(x)):
        if not missing[t]:
            out[t, x[t]] = 1.0
            continue
        for value in range(k):
            clamped_x, clamped_missing = x.copy(), missing.copy()
            clamped_x[t], clamped_missing[t] = value, False
            out[t, value] = math.exp(forward(init, trans, emit, clamped_x, clamped_missing, soft) - log_z)
    return out


def viterbi(init, trans, emit, x, missing=None, soft=None) -> tuple[float, np.ndarray, np.ndarray]:
    """Best joint (hidden path, missing values) by Viterbi in log space.

    Returns ``(log score, path (T,), decoded x (T,))`` where the score is
    ``log p(z, x) + sum_t w[t, x_t]`` of the decoded pair.
    """
    length = len(x)

    def argmax_reduce(a, axis):
        return np.max(a, axis=axis)

    delta = _log(init) + _log_emission(emit, x, missing, soft, 0, argmax_reduce)
    back = []
    for t in range(1, length):
        scores = delta[:, None] + _log(_transition(trans, t - 1))
        back.append(np.argmax(scores, 0))
        delta = np.max(scores, 0) + _log_emission(emit, x, missing, soft, t, argmax_reduce)
    path = np.zeros(length, dtype=np.int64)
    path[-1] = int(np.argmax(delta))
    for t in range(length - 2, -1, -1):
        path[t] = back[t][path[t + 1]]
    decoded = x.copy()
    for t in range(length):
        if missing is not None and missing[t]:
            log_e = _log(_emission(emit, t)[path[t]])
            weights = soft[t, : len(log_e)] if soft is not None else 0.0
            decoded[t] = int(np.argmax(log_e + weights))
    return float(np.max(delta)), path, decoded


def joint_log_score(init, trans, emit, x, soft=None) -> float:
    """max over hidden paths of log p(z, x) + sum_t w[t, x_t] for a full assignment x."""
    score, _, _ = viterbi(init, trans, emit, x, None, soft)
    return score


def random_params(rng: np.random.Generator, num_states: int, num_cats: int, concentration: float = 1.0):
    """Random (initial (H,), transition (H, H), emission (H, K)) with Dirichlet rows."""
    init = rng.dirichlet(np.full(num_states, concentration))
    trans = rng.dirichlet(np.full(num_states, concentration), size=num_states)
    emit = rng.dirichlet(np.full(num_cats, concentration), size=num_states)
    return init, trans, emit


def forward_scaled(init, trans, emit, x) -> float:
    """log p(x) of a fully observed homogeneous HMM by the normalised (scaled) forward
    recursion: fast for long sequences with many states."""
    alpha = init * emit[:, x[0]]
    total = alpha.sum()
    log_p, alpha = math.log(total), alpha / total
    for t in range(1, len(x)):
        alpha = (alpha @ trans) * emit[:, x[t]]
        total = alpha.sum()
        log_p, alpha = log_p + math.log(total), alpha / total
    return log_p
