"""Structure builders (HCLT, RAT-SPN, Poon-Domingos, mixtures) against brute force."""

from __future__ import annotations

import importlib
import itertools
import math
from collections import Counter

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pclayer.nodes import SumGroup, topological_order
from pclayer.structures import chow_liu_tree, hclt, mixture, pairwise_mutual_information, poon_domingos, rat_spn
from pclayer.structures.poon_domingos import decompositions

hclt_module = importlib.import_module("pclayer.structures.hclt")  # the package re-exports the function as `hclt`
SMALL = settings(max_examples=15, deadline=None)


def all_assignments(num_vars: int, num_cats: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(num_cats), repeat=num_vars)), dtype=torch.long)


def check_normalised_and_marginals(root: pc.NodeGroup, num_vars: int, num_cats: int, hidden: int) -> None:
    """exp(log_prob) sums to 1 over all assignments; summing out ``hidden`` matches brute force."""
    circuit = pc.compile(root, dtype=torch.float64)
    x = all_assignments(num_vars, num_cats)
    log_p = circuit.log_prob(x)
    assert torch.isfinite(log_p).all()
    assert math.isclose(log_p.exp().sum().item(), 1.0, rel_tol=0, abs_tol=1e-9)
    missing = torch.zeros_like(x, dtype=torch.bool)
    missing[:, hidden] = True
    marginal = circuit.log_prob(x, missing=missing)
    key = torch.cat([x[:, :hidden], x[:, hidden + 1:]], dim=1)
    brute: dict[tuple, float] = {}
    for row, value in zip(key.tolist(), log_p.exp().tolist()):
        brute[tuple(row)] = brute.get(tuple(row), 0.0) + value
    expected = torch.tensor([brute[tuple(row)] for row in key.tolist()], dtype=torch.float64)
    torch.testing.assert_close(marginal.exp(), expected, rtol=1e-9, atol=1e-12)


def parameters(root: pc.NodeGroup) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pc.compile(root, dtype=torch.float64).params.items()}


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def assert_different_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[key], b[key]) for key in a)


# ----------------------------------------------------------------------------- HCLT


def brute_force_mutual_information(column_a: list[int], column_b: list[int]) -> float:
    n = len(column_a)
    count_a, count_b, count_ab = Counter(column_a), Counter(column_b), Counter(zip(column_a, column_b))
    return sum(c / n * math.log(c * n / (count_a[i] * count_b[j])) for (i, j), c in count_ab.items())


def brute_force_max_spanning_tree(weights: np.ndarray) -> tuple[set[frozenset[int]], float]:
    """The maximum-weight spanning tree and its weight, by enumerating every (V-1)-subset of edges."""
    num_vars = weights.shape[0]
    pairs = list(itertools.combinations(range(num_vars), 2))
    best, best_weight = None, -math.inf
    for subset in itertools.combinations(pairs, num_vars - 1):
        parent = list(range(num_vars))

        def find(v: int) -> int:
            while parent[v] != v:
                v = parent[v]
            return v

        acyclic = True
        for a, b in subset:
            ra, rb = find(a), find(b)
            if ra == rb:
                acyclic = False
                break
            parent[ra] = rb
        weight = sum(weights[a, b] for a, b in subset)
        if acyclic and weight > best_weight:
            best, best_weight = subset, weight
    return {frozenset(edge) for edge in best}, best_weight


def planted_chain_data(order: list[int], num_rows: int, num_cats: int, seed: int) -> np.ndarray:
    """Samples of a Markov chain visiting variables in ``order``: each copies its predecessor w.p. 0.8."""
    rng = np.random.default_rng(seed)
    data = np.zeros((num_rows, len(order)), dtype=np.int64)
    data[:, order[0]] = rng.integers(0, num_cats, num_rows)
    for prev, var in zip(order, order[1:]):
        copy = rng.random(num_rows) < 0.8
        data[:, var] = np.where(copy, data[:, prev], rng.integers(0, num_cats, num_rows))
    return data


@SMALL
@given(st.integers(1, 5), st.integers(1, 60), st.integers(1, 4), st.integers(0, 2**31), st.sampled_from(["dense", "sorted"]))
def test_mutual_information_matches_brute_force(num_vars, num_rows, num_cats, seed, method):
    data = np.random.default_rng(seed).integers(0, num_cats, (num_rows, num_vars))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hclt_module, "_DENSE_WIDTH", 4096 if method == "dense" else 0)
        patch.setattr(hclt_module, "_CHUNK_ENTRIES", 64)  # several chunks / blocks
        patch.setattr(hclt_module, "_SORT_ENTRIES", 64)
        info = pairwise_mutual_information(data, num_cats)
    for i, j in itertools.permutations(range(num_vars), 2):
        expected = brute_force_mutual_information(data[:, i].tolist(), data[:, j].tolist())
        assert math.isclose(info[i, j].item(), max(expected, 0.0), abs_tol=1e-12)
    assert torch.all(info.diagonal() == 0) and torch.equal(info, info.t())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chow_liu_tree_recovers_planted_chain_and_brute_force_tree(seed):
    num_vars = 6
    order = np.random.default_rng(100 + seed).permutation(num_vars).tolist()
    data = planted_chain_data(order, num_rows=3000, num_cats=3, seed=seed)
    edges = chow_liu_tree(torch.from_numpy(data), num_cats=3)
    learned = {frozenset(edge) for edge in edges}
    chain = {frozenset(pair) for pair in zip(order, order[1:])}
    weights = np.array([[brute_force_mutual_information(data[:, i].tolist(), data[:, j].tolist())
                         for j in range(num_vars)] for i in range(num_vars)])
    assert learned == chain
    assert learned == brute_force_max_spanning_tree(weights)[0]
    # rooted at variable 0, breadth first: every parent is the root or an earlier child
    seen = {0}
    for parent, child in edges:
        assert parent in seen and child not in seen
        seen.add(child)
    assert seen == set(range(num_vars))


@SMALL
@given(st.integers(2, 6), st.integers(2, 3), st.integers(0, 2**31))
def test_chow_liu_tree_has_the_brute_force_maximum_weight(num_vars, num_cats, seed):
    data = np.random.default_rng(seed).integers(0, num_cats, (30, num_vars))
    weights = np.array([[brute_force_mutual_information(data[:, i].tolist(), data[:, j].tolist())
                         for j in range(num_vars)] for i in range(num_vars)])
    edges = chow_liu_tree(data, num_cats)
    assert len({frozenset(edge) for edge in edges}) == num_vars - 1
    assert math.isclose(sum(weights[a, b] for a, b in edges), brute_force_max_spanning_tree(weights)[1], abs_tol=1e-9)


@SMALL
@given(st.integers(1, 5), st.integers(1, 3), st.integers(2, 3), st.integers(0, 2**31), st.data())
def test_hclt_normalised_marginals_and_parameter_count(num_vars, num_states, num_cats, seed, data):
    rows = np.random.default_rng(seed).integers(0, num_cats, (40, num_vars))
    root = hclt(rows, num_states, num_cats, seed=seed)
    check_normalised_and_marginals(root, num_vars, num_cats, data.draw(st.integers(0, num_vars - 1)))
    expected = num_vars * num_states * (num_cats - 1) + (num_vars - 1) * num_states * (num_states - 1) + num_states - 1
    assert pc.compile(root).num_parameters() == expected


def test_hclt_structure_follows_the_tree():
    order = [3, 0, 4, 1, 2]
    data = planted_chain_data(order, num_rows=2000, num_cats=2, seed=5)
    root = hclt(data, num_states=3, num_cats=2, seed=0)
    latent_edges = {g.name for g in topological_order(root) if isinstance(g, SumGroup) and g.name != "hclt.root"}
    assert latent_edges == {f"hclt.latent[{c}|{p}]" for p, c in chow_liu_tree(data, 2)}
    assert root.children[0].name == "hclt.block[0]"


def test_hclt_seeds():
    data = np.random.default_rng(0).integers(0, 3, (50, 4))
    assert_same_parameters(parameters(hclt(data, 2, 3, seed=7)), parameters(hclt(data, 2, 3, seed=7)))
    assert_different_parameters(parameters(hclt(data, 2, 3, seed=7)), parameters(hclt(data, 2, 3, seed=8)))


@pytest.mark.parametrize(("data", "kwargs", "error", "words"), [
    (np.zeros((5, 3), dtype=np.int64), {"num_states": 0}, ValueError, ["num_states", "positive int"]),
    (np.zeros((5, 3), dtype=np.int64), {"num_cats": 2.0}, ValueError, ["num_cats", "positive int"]),
    (np.zeros((5, 3), dtype=np.int64), {"seed": "a"}, TypeError, ["seed", "int or None"]),
    (np.zeros(5, dtype=np.int64), {}, ValueError, ["data", "shape (N, V)", "(5,)"]),
    (np.zeros((0, 3), dtype=np.int64), {}, ValueError, ["data", "N >= 1"]),
    (np.array([[0.0, np.nan]]), {}, ValueError, ["data", "NaN", "(0, 1)"]),
    (torch.tensor([[0.0, float("nan")]]), {}, ValueError, ["data", "NaN", "(0, 1)"]),
    (np.zeros((2, 2)), {}, TypeError, ["data", "integer", "float64"]),
    (torch.zeros(2, 2, dtype=torch.bool), {}, TypeError, ["data", "integer", "bool"]),
    ([[0, 1]], {}, TypeError, ["data", "torch.Tensor or numpy.ndarray", "list"]),
    (np.array([[0, 1], [2, 0]]), {}, ValueError, ["data", "value 2", "row 1, variable 0", "[0, 2)"]),
    (torch.tensor([[0, -1]]), {}, ValueError, ["data", "value -1", "[0, 2)"]),
])
def test_hclt_rejects_bad_arguments(data, kwargs, error, words):
    arguments = {"num_states": 2, "num_cats": 2} | kwargs
    with pytest.raises(error) as info:
        hclt(data, arguments.pop("num_states"), arguments.pop("num_cats"), **arguments)
    for word in words:
        assert word in str(info.value)


# ----------------------------------------------------------------------------- RAT-SPN


@st.composite
def rat_arguments(draw):
    num_cats = draw(st.integers(2, 3))
    num_vars = draw(st.integers(1, 6 if num_cats == 2 else 4))
    depth = draw(st.integers(0, num_vars.bit_length() - 1))
    return num_vars, num_cats, depth, draw(st.integers(1, 3)), draw(st.integers(1, 3))


@SMALL
@given(rat_arguments(), st.integers(0, 2**31), st.data())
def test_rat_spn_normalised_marginals_and_parameter_count(arguments, seed, data):
    num_vars, num_cats, depth, reps, states = arguments
    root = rat_spn(num_vars, num_cats, depth, reps, states, seed=seed)
    check_normalised_and_marginals(root, num_vars, num_cats, data.draw(st.integers(0, num_vars - 1)))
    inputs = reps * num_vars * states * (num_cats - 1)
    if depth == 0:
        sums = reps * states - 1
    else:
        sums = reps * (2**depth - 2) * states * (states**2 - 1) + reps * states**2 - 1
    assert pc.compile(root).num_parameters() == inputs + sums


def test_rat_spn_regions_split_random_permutations_in_halves():
    root = rat_spn(7, 2, 2, 3, 2, seed=3)
    assert len(root.children) == 3 and root.num_child_nodes == 3 * 2**2
    left_scopes = set()
    for top in root.children:
        halves = top.children
        assert [len(h.scope) for h in halves] == [3, 4] and halves[0].scope | halves[1].scope == frozenset(range(7))
        leaf_regions = [region for half in halves for region in half.children[0].children]
        assert [len(r.scope) for r in leaf_regions] == [1, 2, 2, 2]
        assert all(r.num_nodes == 2 for r in leaf_regions)
        assert frozenset().union(*(r.scope for r in leaf_regions)) == frozenset(range(7))
        left_scopes.add(halves[0].scope)
    assert len(left_scopes) > 1  # the repetitions use different random permutations


def test_rat_spn_seeds():
    assert_same_parameters(parameters(rat_spn(5, 3, 2, 2, 2, seed=1)), parameters(rat_spn(5, 3, 2, 2, 2, seed=1)))
    assert_different_parameters(parameters(rat_spn(5, 3, 2, 2, 2, seed=1)), parameters(rat_spn(5, 3, 2, 2, 2, seed=2)))


@pytest.mark.parametrize(("arguments", "words"), [
    ((0, 2, 0, 1, 1), ["num_vars", "positive int"]),
    ((4, 0, 1, 1, 1), ["num_cats", "positive int"]),
    ((4, 2, -1, 1, 1), ["depth", "int >= 0"]),
    ((4, 2, 1, 0, 1), ["num_repetitions", "positive int"]),
    ((4, 2, 1, 1, True), ["num_states", "positive int"]),
    ((5, 2, 3, 1, 1), ["depth", "2**depth = 8", "num_vars = 5", "depth <= 2"]),
])
def test_rat_spn_rejects_bad_arguments(arguments, words):
    with pytest.raises(ValueError) as info:
        rat_spn(*arguments)
    for word in words:
        assert word in str(info.value)


# ----------------------------------------------------------------------------- Poon-Domingos


@st.composite
def pd_arguments(draw):
    height, width = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    num_cats = 2 if height * width > 4 else draw(st.integers(2, 3))
    delta = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    return (height, width), num_cats, delta, draw(st.integers(1, 2))


@SMALL
@given(pd_arguments(), st.integers(0, 2**31), st.data())
def test_poon_domingos_normalised_and_marginals(arguments, seed, data):
    shape, num_cats, delta, states = arguments
    num_vars = shape[0] * shape[1]
    root = poon_domingos(shape, num_cats, delta, states, seed=seed)
    assert root.scope == frozenset(range(num_vars))
    check_normalised_and_marginals(root, num_vars, num_cats, data.draw(st.integers(0, num_vars - 1)))


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (2, 2), (2, 3), (3, 3)])
def test_poon_domingos_fine_parameter_count(shape):
    """With delta = 1 every sub-rectangle is a region and splits at every position."""
    height, width, states, cats = *shape, 2, 3
    inputs = height * width * states * (cats - 1)
    sums = 0
    for h, w in itertools.product(range(1, height + 1), range(1, width + 1)):
        if h * w == 1:
            continue
        splits = (h - 1) + (w - 1)
        nodes = 1 if (h, w) == shape else states
        sums += (height - h + 1) * (width - w + 1) * nodes * (splits * states**2 - 1)
    if shape == (1, 1):
        sums = states - 1
    assert pc.compile(poon_domingos(shape, cats, 1, states, seed=0)).num_parameters() == inputs + sums


def test_poon_domingos_shares_regions_between_decompositions():
    # 4x4 with delta 2: root, 2 half-height, 2 half-width, 4 quadrants (each reached from two
    # parents), and per quadrant 2 rows + 2 columns at the fine resolution = 25 sum regions.
    root = poon_domingos((4, 4), 2, 2, 2, seed=0)
    groups = topological_order(root)
    regions = [g for g in groups if isinstance(g, SumGroup)]
    assert len(regions) == 25
    assert len({g.name for g in regions}) == 25
    assert sum(g.kind == "input" for g in groups) == 16
    quadrant = next(g for g in regions if g.name == "pd.region[0:2,0:2]")
    parents = [g for g in groups if quadrant in g.children]
    assert len(parents) == 2


def test_poon_domingos_variable_layout_and_cuts():
    root = poon_domingos((2, 3), 2, (1, 2), 1, seed=0)
    pixels = {g.name: g.var for g in topological_order(root) if g.kind == "input"}
    assert pixels["pd.pixel[1,2]"] == 5 and pixels["pd.pixel[0,1]"] == 1
    # rows cut at 1, columns at the multiple of 2 only
    assert decompositions((0, 2, 0, 3), (1, 2)) == [((0, 1, 0, 3), (1, 2, 0, 3)), ((0, 2, 0, 2), (0, 2, 2, 3))]
    # inside one coarse cell: every fine cut
    assert decompositions((0, 2, 0, 2), (2, 2)) == [((0, 1, 0, 2), (1, 2, 0, 2)), ((0, 2, 0, 1), (0, 2, 1, 2))]


def test_poon_domingos_seeds():
    assert_same_parameters(parameters(poon_domingos((2, 3), 2, 1, 2, seed=4)), parameters(poon_domingos((2, 3), 2, 1, 2, seed=4)))
    assert_different_parameters(parameters(poon_domingos((2, 3), 2, 1, 2, seed=4)), parameters(poon_domingos((2, 3), 2, 1, 2, seed=5)))


@pytest.mark.parametrize(("arguments", "words"), [
    ((4, 2, 1, 1), ["shape", "(height, width)"]),
    (((2, 2, 2), 2, 1, 1), ["shape", "(height, width)"]),
    (((0, 2), 2, 1, 1), ["shape[0]", "positive int"]),
    (((2, 2), 0, 1, 1), ["num_cats", "positive int"]),
    (((2, 2), 2, 0, 1), ["delta", "positive int"]),
    (((2, 2), 2, (1, 0), 1), ["delta[1]", "positive int"]),
    (((2, 2), 2, (1, 1, 1), 1), ["delta", "(rows, cols)"]),
    (((2, 2), 2, 1, 0), ["num_states", "positive int"]),
])
def test_poon_domingos_rejects_bad_arguments(arguments, words):
    with pytest.raises(ValueError) as info:
        poon_domingos(*arguments)
    for word in words:
        assert word in str(info.value)


# ----------------------------------------------------------------------------- mixtures


@SMALL
@given(st.integers(1, 4), st.integers(0, 2**31), st.data())
def test_mixture_is_the_weighted_sum_of_its_components(num_vars, seed, data):
    components = [
        pc.structures.hmm(num_vars, 2, 2, seed=seed),
        rat_spn(num_vars, 2, data.draw(st.integers(0, num_vars.bit_length() - 1)), 2, 2, seed=seed),
    ]
    raw = np.random.default_rng(seed).uniform(0.1, 1.0, len(components))
    weights = raw / raw.sum()
    root = mixture(*components, weights=weights)
    check_normalised_and_marginals(root, num_vars, 2, data.draw(st.integers(0, num_vars - 1)))
    x = all_assignments(num_vars, 2)
    expected = sum(w * pc.compile(c, torch.float64).log_prob(x).exp() for w, c in zip(weights, components))
    torch.testing.assert_close(pc.compile(root, torch.float64).log_prob(x).exp(), expected, rtol=1e-9, atol=1e-12)


def test_mixture_random_weights_and_seeds():
    component = rat_spn(3, 2, 1, 1, 2, seed=0)
    other = rat_spn(3, 2, 1, 1, 2, seed=1)
    same = [mixture(component, other, seed=3).params for _ in range(2)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    assert not torch.equal(same[0], mixture(component, other, seed=4).params)
    assert same[0].shape == (1, 2) and math.isclose(same[0].sum().item(), 1.0)
    assert pc.compile(mixture(component, other, seed=3)).num_parameters() == 2 * 9 + 1


@pytest.mark.parametrize(("circuits", "kwargs", "error", "words"), [
    ((), {}, ValueError, ["circuits", "at least one"]),
    (("root",), {}, TypeError, ["circuits[0]", "node group", "str"]),
    ((pc.inputs(0, 2, pc.Categorical(2)),), {}, ValueError, ["circuits[0]", "one node", "2"]),
    ((rat_spn(2, 2, 1, 1, 1), rat_spn(3, 2, 1, 1, 1)), {}, pc.StructureError, ["circuits[1]", "scope", "{0, 1, 2}"]),
    ((rat_spn(2, 2, 1, 1, 1),) * 2, {"weights": [1.0]}, ValueError, ["weights", "shape (2,)"]),
    ((rat_spn(2, 2, 1, 1, 1),) * 2, {"weights": [0.5, float("nan")]}, ValueError, ["weights", "NaN"]),
    ((rat_spn(2, 2, 1, 1, 1),) * 2, {"weights": [1.5, -0.5]}, ValueError, ["weights", "non-negative"]),
    ((rat_spn(2, 2, 1, 1, 1),) * 2, {"weights": [0.5, 0.6]}, ValueError, ["weights", "summing to 1", "1.1"]),
    ((rat_spn(2, 2, 1, 1, 1),), {"seed": 1.5}, TypeError, ["seed", "int or None"]),
])
def test_mixture_rejects_bad_arguments(circuits, kwargs, error, words):
    with pytest.raises(error) as info:
        mixture(*circuits, **kwargs)
    for word in words:
        assert word in str(info.value)
