"""pclayer.testing.reference and pclayer.inspection: the references agree with each other and
with compiled circuits, views follow trained parameters, and only the strategies need hypothesis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pclayer.inspection import describe
from pclayer.testing import reference
from pclayer.testing.strategies import circuits, evidence

ROOT = Path(__file__).resolve().parents[1]


@given(circuits(), st.data())
def test_symbolic_walk_equals_enumeration_of_the_joint(root, data):
    x, missing, weights = data.draw(evidence(root, batch=3))
    assignments, probs = reference.distribution(root)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    num_vars = assignments.shape[1]
    walked = reference.log_prob(root, x, missing, weights)
    post = reference.posterior(root, x, missing, weights)
    best = reference.mpe(root, x, missing, weights)
    for b in range(len(x)):
        consistent = np.all((assignments == x[b]) | missing[b], axis=1)
        weighted = probs * (1.0 if weights is None else np.exp(weights[b][np.arange(num_vars), assignments].sum(1)))
        weighted = np.where(consistent, weighted, 0.0)
        with np.errstate(divide="ignore"):
            assert walked[b] == pytest.approx(np.log(weighted.sum()), rel=1e-10, abs=1e-12)
        if weighted.sum() > 0:
            for v in range(num_vars):
                expected = np.bincount(assignments[:, v], weights=weighted / weighted.sum(), minlength=post.shape[2])
                np.testing.assert_allclose(post[b, v], expected, atol=1e-10)
        else:
            assert np.isnan(post[b]).all() and best.log_value[b] == -np.inf
    np.testing.assert_allclose(best.log_value, reference.log_prob(root, x, missing, weights, max_product=True), rtol=1e-12)
    np.testing.assert_array_equal(best.x[~missing], x[~missing])


@given(circuits(gaussian=True), st.data())
def test_circuits_with_gaussian_inputs_match_the_compiled_circuit(root, data):
    x, missing, _ = data.draw(evidence(root, batch=4, soft=False))
    circuit = pc.compile(root, dtype=torch.float64)
    expected = reference.log_prob(root, x, missing)
    result = circuit.log_prob(torch.as_tensor(x), torch.as_tensor(missing)).detach().numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)


@given(circuits(gaussian=True, builders=True), st.data())
def test_views_follow_the_trained_parameters_of_the_compiled_circuit(root, data):
    """After optimizer steps the view of the compiled circuit reproduces its log_prob; the
    view of the symbolic circuit still gives the initial one."""
    x, missing, _ = data.draw(evidence(root, batch=6, soft=False))
    circuit = pc.compile(root, dtype=torch.float64)
    xt, mt = torch.as_tensor(x), torch.as_tensor(missing)
    before = circuit.log_prob(xt, mt).detach().numpy()
    parameters = list(circuit.parameters())
    if not parameters:  # indicator leaves only
        return
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        (-circuit.log_prob(xt, mt).sum()).backward()
        optimizer.step()
    trained = describe(root, circuit)
    np.testing.assert_allclose(reference.log_prob(trained, x, missing), circuit.log_prob(xt, mt).detach().numpy(),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(reference.log_prob(root, x, missing), before, rtol=1e-9, atol=1e-12)
    for group in trained.groups:
        if group.kind == "sum":
            np.testing.assert_allclose(group.params["weights"].sum(1).numpy(), 1.0, rtol=1e-12)


def test_view_lists_groups_children_edges_and_ties():
    a = pc.inputs(0, 2, pc.Categorical(3), params={"probs": [[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]})
    b = pc.inputs(1, 2, pc.Bernoulli(), params={"p": [0.1, 0.7]})
    b_tied = pc.inputs(1, 2, pc.Bernoulli(), tie=b)
    products = pc.multiply(a, b, edges=[[0, 1], [1, 0], [1, 1]])
    other = pc.multiply(a, b_tied)
    root = pc.summate(products, other, num_nodes=1, edges=[[0, 0, 0], [0, 2, 4]], params=[0.5, 0.3, 0.2])
    view = describe(root)
    kinds = [g.kind for g in view.groups]
    assert kinds.count("input") == 3 and view.root.kind == "sum" and view.var_cats == (3, 2)
    assert view.root.children == tuple(g.index for g in view.groups if g.kind == "product")
    assert view.root.edges.tolist() == [[0, 0, 0], [0, 2, 4]]
    np.testing.assert_allclose(view.root.params["weights"].numpy(), [[0.5, 0.0, 0.3, 0.0, 0.2]])
    tied = [g for g in view.groups if g.tied_to is not None]
    assert len(tied) == 1 and view.groups[tied[0].tied_to].params["p"].tolist() == [0.1, 0.7]
    first = next(g for g in view.groups if g.kind == "product" and g.num_nodes == 3)
    assert first.edges.tolist() == [[0, 1], [1, 0], [1, 1]] and first.scope == (0, 1)


def test_view_rejects_a_circuit_compiled_from_another_root():
    with pytest.raises(ValueError, match="circuit: .*compiled from root"):
        describe(pc.structures.hmm(3, 2, 2, seed=0), pc.compile(pc.structures.hmm(3, 3, 2, seed=0)))
    with pytest.raises(TypeError, match="root: expected a node group"):
        describe("root")


def test_reference_names_bad_arguments():
    root = pc.structures.hmm(3, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3\)"):
        reference.log_prob(root, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="x: variable 1 takes values in 0..1"):
        reference.log_prob(root, np.array([[0, 2, 0]]))
    with pytest.raises(TypeError, match="circuit: expected a root node group"):
        reference.log_prob(pc.compile(root), np.zeros((1, 3)))


def test_only_the_strategies_need_hypothesis():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import pclayer as pc\n"
        "from pclayer.testing import check_circuit, reference\n"
        "root = pc.structures.hmm(3, 2, 2, seed=0)\n"
        "check_circuit(pc.compile(root, dtype=__import__('torch').float64), num_samples=200)\n"
        "print(reference.distribution(root)[1].sum())\n"
        "try:\n"
        "    import pclayer.testing.strategies\n"
        "except ImportError as err:\n"
        "    print('ImportError:', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ImportError: pclayer.testing.strategies needs hypothesis: pip install 'pclayer[testing]'" in result.stdout
