"""Hypothesis strategies for property-based tests of circuits.

* :func:`circuits`: random valid circuit roots: hand-built smooth, decomposable DAGs (dense
  and sparse sums, products with default and explicit edges, shared sub-circuits, tied
  parameters, Categorical / Bernoulli / Binomial / Indicator / Gaussian inputs), or the structure
  builders of :mod:`pclayer.structures` with random sizes.
* :func:`deterministic_circuits`: random deterministic circuits (the MPE is the exact argmax).
* :func:`evidence`: random ``(x, missing, soft_evidence)`` query arguments for a circuit.

Needs hypothesis: ``pip install pclayer[testing]``.
"""

from __future__ import annotations

import math

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("pclayer.testing.strategies needs hypothesis: pip install 'pclayer[testing]' "
                      "(pclayer.testing.reference and check_circuit work without it)") from err

import pclayer as pc
from pclayer.inspection import describe

__all__ = ["circuits", "deterministic_circuits", "evidence"]


def _simplex_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    raw = rng.uniform(0.05, 1.0, size=(rows, cols))
    return raw / raw.sum(-1, keepdims=True)


class _RandomCircuit:
    """Builds a random smooth, decomposable DAG from hypothesis draws (structure) and a
    numpy generator (parameter values).

    Mixes dense sums, sparse sums with explicit edges, products with default and explicit
    edges, shared sub-circuits (a pool of groups per scope), tied parameters, and
    Categorical / Bernoulli / Binomial / Indicator leaves (Gaussian ones for variables with 0
    categories).
    """

    def __init__(self, draw, var_cats: list[int], rng: np.random.Generator):
        self.draw = draw
        self.var_cats = var_cats
        self.rng = rng
        self.pool: dict[frozenset, list[pc.NodeGroup]] = {}
        self.tieable_inputs: list[pc.InputGroup] = []
        self.tieable_sums: list[pc.SumGroup] = []

    def _remember(self, group: pc.NodeGroup) -> pc.NodeGroup:
        self.pool.setdefault(group.scope, []).append(group)
        return group

    def _shared(self, scope: frozenset, size: int | None) -> pc.NodeGroup | None:
        candidates = [g for g in self.pool.get(scope, []) if size is None or g.num_nodes == size]
        if candidates and self.draw(st.integers(0, 3)) == 0:
            return candidates[self.draw(st.integers(0, len(candidates) - 1))]
        return None

    def _size(self, size: int | None) -> int:
        return size if size is not None else self.draw(st.integers(1, 3))

    def group(self, scope: frozenset, size: int | None, budget: int) -> pc.NodeGroup:
        shared = self._shared(scope, size)
        if shared is not None:
            return shared
        if len(scope) == 1:
            choice = self.draw(st.integers(0, 2)) if budget > 0 else 0
            return self.leaf(next(iter(scope)), self._size(size)) if choice < 2 else self.sum(scope, self._size(size), budget - 1)
        if budget <= 0 or self.draw(st.booleans()):
            return self.product(scope, self._size(size), budget)
        return self.sum(scope, self._size(size), budget - 1)

    def leaf(self, var: int, size: int) -> pc.InputGroup:
        k = self.var_cats[var]
        if k == 0:
            params = {"mean": self.rng.normal(size=size) * 2, "std": self.rng.uniform(0.3, 2.0, size=size)}
            return self._remember(pc.inputs(var, size, pc.Gaussian(), params=params))
        kinds = ["categorical", "indicator", "binomial"] + (["bernoulli"] if k == 2 else [])
        kind = self.draw(st.sampled_from(kinds))
        if kind == "indicator":
            values = tuple(self.draw(st.lists(st.integers(0, k - 1), min_size=size, max_size=size)))
            return self._remember(pc.inputs(var, size, pc.Indicator(k, values=values)))
        dist = {"categorical": pc.Categorical(k), "bernoulli": pc.Bernoulli(), "binomial": pc.Binomial(k - 1) if k > 1 else None}[kind]
        if dist is None:  # a one-value variable has no binomial
            dist, kind = pc.Categorical(k), "categorical"
        ties = [g for g in self.tieable_inputs if g.dist == dist and g.num_nodes == size]
        if ties and self.draw(st.booleans()):
            return self._remember(pc.inputs(var, size, dist, tie=ties[0]))
        if kind == "categorical":
            params = {"probs": _simplex_rows(self.rng, size, k)}
        else:
            params = {"p": self.rng.uniform(0.05, 0.95, size=size)}
        group = pc.inputs(var, size, dist, params=params)
        self.tieable_inputs.append(group)
        return self._remember(group)

    def product(self, scope: frozenset, size: int, budget: int) -> pc.ProductGroup:
        variables = sorted(scope)
        parts_count = self.draw(st.integers(2, min(3, len(variables))))
        labels = self.draw(st.lists(st.integers(0, parts_count - 1), min_size=len(variables), max_size=len(variables)))
        labels[:parts_count] = list(range(parts_count))  # every part non-empty
        parts = [frozenset(v for v, lab in zip(variables, labels) if lab == p) for p in range(parts_count)]
        if self.draw(st.booleans()):
            children = [self.group(part, size, budget) for part in parts]
            return self._remember(pc.multiply(*children))
        children = [self.group(part, None, budget) for part in parts]
        edges = np.stack([self.rng.integers(0, c.num_nodes, size=size) for c in children], axis=1)
        return self._remember(pc.multiply(*children, edges=edges))

    def sum(self, scope: frozenset, size: int, budget: int) -> pc.SumGroup:
        count = self.draw(st.integers(1, 2))
        children = [self.group(scope, None, budget) for _ in range(count)]
        total = sum(c.num_nodes for c in children)
        if self.draw(st.booleans()):
            ties = [g for g in self.tieable_sums if g.edges is None and g.num_nodes == size and g.num_child_nodes == total]
            if ties and self.draw(st.booleans()):
                return self._remember(pc.summate(*children, num_nodes=size, tie=ties[0]))
            group = pc.summate(*children, num_nodes=size, params=_simplex_rows(self.rng, size, total))
            self.tieable_sums.append(group)
            return self._remember(group)
        ties = [g for g in self.tieable_sums if g.edges is not None and g.num_nodes == size and g.num_child_nodes == total]
        if ties and self.draw(st.booleans()):
            return self._remember(pc.summate(*children, num_nodes=size, edges=ties[0].edges, tie=ties[0]))
        pairs = []
        for node in range(size):
            picked = self.rng.permutation(total)[: self.rng.integers(1, total + 1)]
            pairs.extend((node, int(c)) for c in picked)
        edges = np.array(pairs, dtype=np.int64).T
        raw = self.rng.uniform(0.05, 1.0, size=edges.shape[1])
        params = raw / np.bincount(edges[0], weights=raw, minlength=size)[edges[0]]
        group = pc.summate(*children, num_nodes=size, edges=edges, params=params)
        self.tieable_sums.append(group)
        return self._remember(group)


class _DeterministicCircuit:
    """Random deterministic circuits: Indicator leaves only, and every sum node's children
    have disjoint supports (they fix a chosen variable to distinct values)."""

    def __init__(self, draw, var_cats: list[int], rng: np.random.Generator):
        self.draw = draw
        self.var_cats = var_cats
        self.rng = rng
        self.indicators: dict[int, pc.InputGroup] = {}

    def indicator(self, var: int) -> pc.InputGroup:
        """All K indicators of ``var`` (shared by every user)."""
        if var not in self.indicators:
            self.indicators[var] = pc.inputs(var, self.var_cats[var], pc.Indicator(self.var_cats[var]))
        return self.indicators[var]

    def _sum_over_values(self, children: pc.NodeGroup, value_of: np.ndarray, size: int) -> pc.SumGroup:
        """Sum nodes each picking children with distinct values of the split variable."""
        pairs = []
        for node in range(size):
            chosen: dict[int, int] = {}
            for child in self.rng.permutation(children.num_nodes):
                chosen.setdefault(int(value_of[child]), int(child))
            keep = list(chosen.values())[: self.rng.integers(1, len(chosen) + 1)]
            pairs.extend((node, c) for c in keep)
        edges = np.array(pairs, dtype=np.int64).T
        raw = self.rng.uniform(0.05, 1.0, size=edges.shape[1])
        params = raw / np.bincount(edges[0], weights=raw, minlength=size)[edges[0]]
        return pc.summate(children, num_nodes=size, edges=edges, params=params)

    def group(self, scope: frozenset, size: int) -> pc.NodeGroup:
        variables = sorted(scope)
        if len(variables) == 1:
            var = variables[0]
            k = self.var_cats[var]
            if self.draw(st.booleans()):
                values = tuple(self.draw(st.lists(st.integers(0, k - 1), min_size=size, max_size=size)))
                return pc.inputs(var, size, pc.Indicator(k, values=values))
            return self._sum_over_values(self.indicator(var), np.arange(k), size)
        if self.draw(st.booleans()):  # product of deterministic parts
            cut = self.draw(st.integers(1, len(variables) - 1))
            left = self.group(frozenset(variables[:cut]), size)
            right = self.group(frozenset(variables[cut:]), size)
            return pc.multiply(left, right)
        split = variables[self.draw(st.integers(0, len(variables) - 1))]
        rest = self.group(scope - {split}, self.draw(st.integers(1, 2)))
        k = self.var_cats[split]
        edges = np.array([[value, r] for value in range(k) for r in range(rest.num_nodes)])
        products = pc.multiply(self.indicator(split), rest, edges=edges)
        return self._sum_over_values(products, edges[:, 0], size)




_BUILDERS = ("hmm", "rat_spn", "poon_domingos", "hclt", "mixture")


def _builder_circuit(draw, name: str, max_vars: int, cats: int, seed: int) -> pc.NodeGroup:
    """A structure builder's circuit with random sizes over at most ``max_vars`` variables."""
    states = draw(st.integers(1, 3))
    if name == "hmm":
        return pc.structures.hmm(draw(st.integers(1, max_vars)), states, cats,
                                 homogeneous=draw(st.booleans()), seed=seed)
    if name == "rat_spn":
        num_vars = draw(st.integers(2, max(2, max_vars)))
        depth = draw(st.integers(1, max(1, int(math.log2(num_vars)))))
        return pc.structures.rat_spn(num_vars, cats, depth, draw(st.integers(1, 2)), states, seed=seed)
    if name == "poon_domingos":
        height = draw(st.integers(1, 2))
        width = draw(st.integers(2 if height == 1 else 1, max(2, max_vars // height)))
        return pc.structures.poon_domingos((height, width), cats, 1, states, seed=seed)
    if name == "hclt":
        num_vars = draw(st.integers(2, max(2, max_vars)))
        data = np.random.default_rng(seed).integers(0, cats, size=(64, num_vars))
        return pc.structures.hclt(data, states, cats, seed=seed)
    num_vars = draw(st.integers(1, max_vars))
    parts = [pc.structures.hmm(num_vars, states, cats, seed=seed + i) for i in range(draw(st.integers(1, 3)))]
    return pc.structures.mixture(*parts, seed=seed)


@st.composite
def circuits(draw, max_vars: int = 4, *, cats: tuple[int, ...] = (2, 3), gaussian: bool = False,
             builders: bool = False) -> pc.NodeGroup:
    """A random valid circuit root (one node) over ``1..max_vars`` variables.

    Args:
        max_vars: largest number of variables (keep it small for brute-force references).
        cats: category counts to draw each variable's from.
        gaussian: also draw continuous variables with Gaussian inputs (about one in four).
        builders: half of the time, a random-size circuit of a structure builder (hmm,
            rat_spn, poon_domingos, hclt, mixture of HMMs) with ``cats[0]`` categories
            instead of a hand-built DAG.
    """
    if isinstance(max_vars, bool) or not isinstance(max_vars, int) or max_vars < 1:
        raise ValueError(f"max_vars: expected a positive int, got {max_vars!r}")
    if not cats or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in cats):
        raise ValueError(f"cats: expected a non-empty tuple of positive ints, got {cats!r}")
    if builders and draw(st.booleans()):
        name = draw(st.sampled_from(_BUILDERS))
        return _builder_circuit(draw, name, max_vars, cats[0], draw(st.integers(0, 2**31 - 1)))
    num_vars = draw(st.integers(1, max_vars))
    choices = [*cats, 0] if gaussian else list(cats)
    var_cats = [draw(st.sampled_from(choices)) for _ in range(num_vars)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return _RandomCircuit(draw, var_cats, rng).group(frozenset(range(num_vars)), 1, budget=2)


@st.composite
def deterministic_circuits(draw, max_vars: int = 4, *, cats: tuple[int, ...] = (2, 3)) -> pc.NodeGroup:
    """A random deterministic circuit root (Indicator leaves; the children of every sum node
    have disjoint supports), on which max-product MPE is the exact argmax of ``log_prob``."""
    num_vars = draw(st.integers(1, max_vars))
    var_cats = [draw(st.sampled_from(list(cats))) for _ in range(num_vars)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return _DeterministicCircuit(draw, var_cats, rng).group(frozenset(range(num_vars)), 1)


def _var_cats(circuit: object) -> list[int]:
    if isinstance(circuit, pc.NodeGroup):
        return list(describe(circuit).var_cats)
    var_cats = getattr(circuit, "var_cats", None)
    if var_cats is None:
        raise TypeError(f"circuit: expected a root node group or a compiled circuit, got {type(circuit).__name__}")
    return [int(k) for k in var_cats]


@st.composite
def evidence(draw, circuit: object, batch: int = 3, *, soft: bool = True):
    """Random query arguments ``(x (B, V), missing (B, V), soft_evidence (B, V, K) or None)``
    as numpy arrays for ``circuit`` (a root group or a compiled circuit).

    ``x`` holds valid values (int64; float64 with Gaussian values when the circuit has
    Gaussian variables), ``missing`` marks about half the entries, and ``soft_evidence`` (when
    ``soft`` and drawn) holds standard normal log-weights.
    """
    var_cats = _var_cats(circuit)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_vars, k = len(var_cats), max(max(var_cats), 1)
    columns = [rng.integers(0, c, size=batch) if c else rng.normal(size=batch) * 2 for c in var_cats]
    x = np.stack(columns, axis=1) if num_vars else np.zeros((batch, 0))
    if 0 not in var_cats:
        x = x.astype(np.int64)
    missing = rng.random((batch, num_vars)) < 0.5
    weights = rng.normal(size=(batch, num_vars, k)) if soft and draw(st.booleans()) else None
    return x, missing, weights
