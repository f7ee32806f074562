"""Independent float64 numpy references for the pclayer tests.

Nothing here uses the compiled program: circuits are evaluated by walking the symbolic
node-group DAG node by node, queries are answered by enumerating every assignment, and
HMMs are answered by the textbook forward algorithm and Viterbi recursion.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pclayer as pc

# ----------------------------------------------------------------------------------------
# Symbolic circuits
# ----------------------------------------------------------------------------------------


def _as_numpy(value) -> np.ndarray:
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)


def variable_cats(root: pc.NodeGroup) -> list[int]:
    """Categories per variable (0 for Gaussian ones), read from the input groups."""
    cats: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        group = stack.pop()
        if group.uid in seen:
            continue
        seen.add(group.uid)
        if isinstance(group, pc.InputGroup):
            cats[group.var] = 0 if isinstance(group.dist, pc.Gaussian) else group.dist.num_cats
        stack.extend(group.children)
    return [cats[v] for v in range(max(cats) + 1)]


def _input_values(group: pc.InputGroup, column: np.ndarray) -> np.ndarray:
    """(A, num_nodes) densities/probabilities of the group's nodes at values ``column`` (A,)."""
    dist, n = group.dist, group.num_nodes
    if isinstance(dist, pc.Gaussian):
        mean, std = _as_numpy(group.params["mean"]), _as_numpy(group.params["std"])
        z = (column[:, None] - mean[None]) / std[None]
        return np.exp(-0.5 * z * z) / (std[None] * math.sqrt(2 * math.pi))
    xs = column.astype(np.int64)
    if isinstance(dist, pc.Indicator):
        values = np.arange(n) if dist.values is None else np.asarray(dist.values)
        return (xs[:, None] == values[None]).astype(np.float64)
    if isinstance(dist, pc.Bernoulli):
        p = _as_numpy(group.params["p"])
        return np.where(xs[:, None] == 1, p[None], 1.0 - p[None])
    if isinstance(dist, pc.Binomial):
        p = _as_numpy(group.params["p"])[None]
        k = xs[:, None]
        coefficients = np.array([math.comb(dist.n, int(v)) for v in xs], dtype=np.float64)[:, None]
        return coefficients * p ** k * (1.0 - p) ** (dist.n - k)
    probs = _as_numpy(group.params["probs"])  # Categorical: (n, K)
    return probs[:, xs].T


def _sum_weights(group: pc.SumGroup) -> np.ndarray:
    """(num_nodes, num_child_nodes) weights, zeros where a sparse group has no edge."""
    params = _as_numpy(group.params)
    if group.edges is None:
        return params
    weights = np.zeros((group.num_nodes, group.num_child_nodes))
    edges = group.edges.numpy()
    weights[edges[0], edges[1]] = params
    return weights


def evaluate(root: pc.NodeGroup, assignments: np.ndarray, max_product: bool = False) -> np.ndarray:
    """Probability (density) of each full assignment (A, V) under the circuit rooted at ``root``.

    Walks the DAG recursively with memoisation; every group's value is an (A, num_nodes)
    array of probabilities in float64. With ``max_product`` sum nodes take the largest
    weighted child instead of the sum (the value of the best latent choices).
    """
    memo: dict[int, np.ndarray] = {}

    def value(group: pc.NodeGroup) -> np.ndarray:
        if group.uid in memo:
            return memo[group.uid]
        if isinstance(group, pc.InputGroup):
            out = _input_values(group, assignments[:, group.var])
        elif isinstance(group, pc.ProductGroup):
            edges = group.edges.numpy()
            out = np.ones((assignments.shape[0], group.num_nodes))
            for i, child in enumerate(group.children):
                out = out * value(child)[:, edges[:, i]]
        else:
            stacked = np.concatenate([value(child) for child in group.children], axis=1)
            if max_product:
                out = (stacked[:, None, :] * _sum_weights(group)[None]).max(-1)
            else:
                out = stacked @ _sum_weights(group).T
        memo[group.uid] = out
        return out

    return value(root)[:, 0]


def all_assignments(var_cats: list[int]) -> np.ndarray:
    """(prod(var_cats), V) every joint assignment, in C order (last variable fastest)."""
    return np.array(list(itertools.product(*[range(k) for k in var_cats])), dtype=np.int64)


def joint_table(root: pc.NodeGroup) -> tuple[np.ndarray, np.ndarray]:
    """(assignments (A, V), probabilities (A,)) of a discrete circuit, by enumeration."""
    assignments = all_assignments(variable_cats(root))
    return assignments, evaluate(root, assignments)


def _weighted(assignments: np.ndarray, probs: np.ndarray, x: np.ndarray, missing: np.ndarray | None,
              soft: np.ndarray | None) -> np.ndarray:
    """(A,) p(a) * prod_i exp(w[i, a_i]) for assignments a consistent with the observed entries."""
    observed = np.ones_like(x, dtype=bool) if missing is None else ~missing
    consistent = np.all((assignments == x[None]) | ~observed[None], axis=1)
    weights = np.ones(len(assignments))
    if soft is not None:
        for i in range(assignments.shape[1]):
            weights = weights * np.exp(soft[i, assignments[:, i]])
    return np.where(consistent, probs * weights, 0.0)


def brute_log_prob(assignments, probs, x, missing=None, soft=None) -> np.ndarray:
    """(B,) log sum over completions of the missing entries of p(x) * prod_i exp(w[b, i, x_i])."""
    out = []
    for b in range(x.shape[0]):
        total = _weighted(assignments, probs, x[b], None if missing is None else missing[b],
                          None if soft is None else soft[b]).sum()
        out.append(np.log(total) if total > 0 else -np.inf)
    return np.array(out)


def brute_posterior(assignments, probs, x, missing=None, soft=None, num_cats: int | None = None) -> np.ndarray:
    """(B, V, K) p(x_i = k | evidence) under the weighted distribution."""
    k_max = num_cats if num_cats is not None else int(assignments.max()) + 1
    out = np.zeros((x.shape[0], assignments.shape[1], k_max))
    for b in range(x.shape[0]):
        weighted = _weighted(assignments, probs, x[b], None if missing is None else missing[b],
                             None if soft is None else soft[b])
        weighted = weighted / weighted.sum()
        for i in range(assignments.shape[1]):
            np.add.at(out[b, i], assignments[:, i], weighted)
    return out


def brute_conditional(assignments, probs, x, missing=None, soft=None) -> np.ndarray:
    """(A,) the weighted conditional distribution of one row (x (V,), missing (V,), soft (V, K))."""
    weighted = _weighted(assignments, probs, x, missing, soft)
    return weighted / weighted.sum()


def brute_max(assignments, probs, x, missing=None, soft=None) -> np.ndarray:
    """(B,) max over completions of p(x) * prod_i exp(w[b, i, x_i]) (the MPE value)."""
    return np.array([
        _weighted(assignments, probs, x[b], None if missing is None else missing[b],
                  None if soft is None else soft[b]).max()
        for b in range(x.shape[0])
    ])


def weighted_value(root: pc.NodeGroup, x: np.ndarray, soft: np.ndarray | None = None,
                   max_product: bool = False) -> np.ndarray:
    """(B,) p(x) * prod_i exp(w[b, i, x_i]) of full assignments x (B, V) (with ``max_product``
    the value of the best latent choices instead of p(x))."""
    values = evaluate(root, x, max_product)
    if soft is not None:
        for i in range(x.shape[1]):
            values = values * np.exp(soft[np.arange(x.shape[0]), i, x[:, i]])
    return values


# ----------------------------------------------------------------------------------------
# Hidden Markov models
# ----------------------------------------------------------------------------------------


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m, axis=axis)


def _log(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(a)


def _transition(trans: np.ndarray, t: int) -> np.ndarray:
    return trans[t] if trans.ndim == 3 else trans


def _emission(emit: np.ndarray, t: int) -> np.ndarray:
    return emit[t] if emit.ndim == 3 else emit


def hmm_log_emission(emit: np.ndarray, x: np.ndarray, missing: np.ndarray | None, soft: np.ndarray | None,
                     t: int, reduce) -> np.ndarray:
    """(H,) log of emission[z, x_t] * exp(w[t, x_t]); a missing x_t is reduced over k by ``reduce``."""
    log_e = _log(_emission(emit, t))  # (H, K)
    k = log_e.shape[1]
    weights = soft[t, :k] if soft is not None else np.zeros(k)
    if missing is not None and missing[t]:
        return reduce(log_e + weights[None], 1)
    return log_e[:, x[t]] + weights[x[t]]


def hmm_forward(init, trans, emit, x, missing=None, soft=None) -> float:
    """log sum_{z, missing x} p(z, x) * prod_t exp(w[t, x_t]) by the forward algorithm in log space.

    init (H,), trans (H, H) or (T-1, H, H) with rows = from-state, emit (H, K) or (T, H, K),
    x (T,), missing (T,) bool, soft (T, K) log-weights.
    """
    length = len(x)
    alpha = _log(init) + hmm_log_emission(emit, x, missing, soft, 0, _logsumexp)
    for t in range(1, length):
        alpha = _logsumexp(alpha[:, None] + _log(_transition(trans, t - 1)), 0)
        alpha = alpha + hmm_log_emission(emit, x, missing, soft, t, _logsumexp)
    return float(_logsumexp(alpha, 0))


def hmm_posterior(init, trans, emit, x, missing, soft=None) -> np.ndarray:
    """(T, K) p(x_t = k | evidence), by clamping each missing variable in turn."""
    k = _emission(emit, 0).shape[1]
    log_z = hmm_forward(init, trans, emit, x, missing, soft)
    out = np.zeros((len(x), k))
    for t in range(len(x)):
        if not missing[t]:
            out[t, x[t]] = 1.0
            continue
        for value in range(k):
            clamped_x, clamped_missing = x.copy(), missing.copy()
            clamped_x[t], clamped_missing[t] = value, False
            out[t, value] = math.exp(hmm_forward(init, trans, emit, clamped_x, clamped_missing, soft) - log_z)
    return out


def hmm_viterbi(init, trans, emit, x, missing=None, soft=None) -> tuple[float, np.ndarray, np.ndarray]:
    """Best joint (hidden path, missing values) by Viterbi in log space.

    Returns ``(log score, path (T,), decoded x (T,))`` where the score is
    ``log p(z, x) + sum_t w[t, x_t]`` of the decoded pair.
    """
    length = len(x)

    def argmax_reduce(a, axis):
        return np.max(a, axis=axis)

    delta = _log(init) + hmm_log_emission(emit, x, missing, soft, 0, argmax_reduce)
    back = []
    for t in range(1, length):
        scores = delta[:, None] + _log(_transition(trans, t - 1))
        back.append(np.argmax(scores, 0))
        delta = np.max(scores, 0) + hmm_log_emission(emit, x, missing, soft, t, argmax_reduce)
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


def hmm_joint_log_score(init, trans, emit, x, soft=None) -> float:
    """max over hidden paths of log p(z, x) + sum_t w[t, x_t] for a full assignment x."""
    score, _, _ = hmm_viterbi(init, trans, emit, x, None, soft)
    return score


def hmm_random_params(rng: np.random.Generator, num_states: int, num_cats: int, concentration: float = 1.0):
    """Random (initial (H,), transition (H, H), emission (H, K)) with Dirichlet rows."""
    init = rng.dirichlet(np.full(num_states, concentration))
    trans = rng.dirichlet(np.full(num_states, concentration), size=num_states)
    emit = rng.dirichlet(np.full(num_cats, concentration), size=num_states)
    return init, trans, emit


def hmm_forward_scaled(init, trans, emit, x) -> float:
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
