"""Exact queries of compiled circuits against the brute-force symbolic reference."""

from __future__ import annotations

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pclayer.inspection import describe
from pclayer.testing import reference
from pclayer.testing.strategies import circuits, deterministic_circuits, evidence


def _var_cats(root) -> list[int]:
    return list(describe(root).var_cats)


def _best_weighted_value(root, x, missing, weights) -> np.ndarray:
    """(B,) max over the completions of each row of p(x) * prod_i exp(w[b, i, x_i]), by
    enumerating the joint (the exact MPE value)."""
    assignments, probs = reference.distribution(root)
    out = []
    for b in range(len(x)):
        consistent = np.all((assignments == x[b]) | missing[b], axis=1)
        value = probs.copy()
        if weights is not None:
            value = value * np.exp(weights[b][np.arange(assignments.shape[1]), assignments].sum(1))
        out.append(np.where(consistent, value, 0.0).max())
    return np.array(out)

pytestmark = pytest.mark.usefixtures("both_programs")  # every property, optimised and plain


def _tensors(x, missing, weights):
    return (torch.as_tensor(x), torch.as_tensor(missing),
            None if weights is None else torch.as_tensor(weights, dtype=torch.float64))


@given(circuits())
def test_log_prob_matches_symbolic_evaluation_and_normalises(root):
    assignments, probs = reference.distribution(root)
    circuit = pc.compile(root, dtype=torch.float64)
    assert circuit.log_prob(torch.zeros(0, circuit.num_vars, dtype=torch.long)).shape == (0,)
    log_p = circuit.log_prob(torch.as_tensor(assignments)).detach().numpy()
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(log_p, np.log(probs), rtol=1e-9, atol=1e-12)
    assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", ["hmm", "rat_spn", "mixture"])
def test_empty_batches_give_empty_results(name):
    """Empty batches through every query (the new strategies found circuits where an empty
    batch crashed the previous engine; the random-circuit test above checks them too)."""
    root = {"hmm": lambda: pc.structures.hmm(3, 2, 3, seed=0),
            "rat_spn": lambda: pc.structures.rat_spn(4, 3, 2, 2, 2, seed=0),
            "mixture": lambda: pc.structures.mixture(pc.structures.hmm(3, 2, 3, seed=1),
                                                     pc.structures.hmm(3, 3, 3, seed=2))}[name]()
    circuit = pc.compile(root, dtype=torch.float64)
    num_vars = circuit.num_vars
    empty = torch.zeros(0, num_vars, dtype=torch.long)
    assert circuit.log_prob(empty).shape == (0,)
    assert circuit.posterior(empty, empty.bool()).shape == (0, num_vars, circuit.num_cats)
    assert circuit.mpe(empty, empty.bool()).shape == empty.shape
    assert circuit.sample(x=empty, missing=empty.bool()).shape == empty.shape


@given(circuits(), st.data())
def test_marginalising_a_variable_equals_summing_it_out(root, data):
    assignments, _ = reference.distribution(root)
    var_cats = _var_cats(root)
    var = data.draw(st.integers(0, len(var_cats) - 1))
    circuit = pc.compile(root, dtype=torch.float64)
    x = torch.as_tensor(assignments)
    missing = torch.zeros_like(x, dtype=torch.bool)
    missing[:, var] = True
    marginal = circuit.log_prob(x, missing=missing).detach().numpy()
    summed = np.zeros(len(assignments))
    for value in range(var_cats[var]):
        clamped = assignments.copy()
        clamped[:, var] = value
        summed += np.exp(reference.log_prob(root, clamped))
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(marginal, np.log(summed), rtol=1e-9, atol=1e-12)


@given(circuits(), st.data())
def test_missing_and_soft_evidence_match_brute_force(root, data):
    var_cats = _var_cats(root)
    x, missing, weights = data.draw(evidence(root, batch=4))
    circuit = pc.compile(root, dtype=torch.float64)
    k = circuit.num_cats
    if weights is None:
        weights = np.random.default_rng(0).normal(size=(4, len(var_cats), k))
    result = circuit.log_prob(*_tensors(x, missing, weights)).detach().numpy()
    np.testing.assert_allclose(result, reference.log_prob(root, x, missing, weights), rtol=1e-9, atol=1e-12)
    # The symbolic walk agrees with summing the enumerated joint.
    assignments, probs = reference.distribution(root)
    for b in range(len(x)):
        consistent = np.all((assignments == x[b]) | missing[b], axis=1)
        weighted = probs * np.exp(weights[b][np.arange(len(var_cats)), assignments].sum(1))
        with np.errstate(divide="ignore"):
            assert result[b] == pytest.approx(np.log(weighted[consistent].sum()), rel=1e-9, abs=1e-12)


@given(circuits(), st.data())
def test_posterior_matches_brute_force(root, data):
    x, missing, weights = data.draw(evidence(root, batch=3))
    circuit = pc.compile(root, dtype=torch.float64)
    xt, mt, wt = _tensors(x, missing, weights)
    finite = np.isfinite(reference.log_prob(root, x, missing, weights))
    if not finite.all():
        with pytest.raises(pc.ZeroProbabilityError, match="posterior: the evidence of rows"):
            circuit.posterior(xt, mt, wt)
        keep = torch.as_tensor(finite)
        if not finite.any():
            return
        x, missing, weights = x[finite], missing[finite], None if weights is None else weights[finite]
        xt, mt, wt = xt[keep], mt[keep], None if wt is None else wt[keep]
    post = circuit.posterior(xt, mt, wt).numpy()
    expected = reference.posterior(root, x, missing, weights)
    np.testing.assert_allclose(post, expected, atol=1e-9)
    observed = ~missing
    rows, cols = np.nonzero(observed)
    np.testing.assert_allclose(post[rows, cols, x[rows, cols]], 1.0, rtol=1e-12)
    others = post[rows, cols].copy()
    others[np.arange(len(rows)), x[rows, cols]] = 0.0
    np.testing.assert_array_equal(others, 0.0)


@given(deterministic_circuits(), st.data())
def test_mpe_is_the_brute_force_argmax_on_deterministic_circuits(root, data):
    x, missing, weights = data.draw(evidence(root, batch=4))
    circuit = pc.compile(root, dtype=torch.float64)
    best = _best_weighted_value(root, x, missing, weights)
    possible = best > 0
    xt, mt, wt = _tensors(x, missing, weights)
    if not possible.all():
        with pytest.raises(pc.ZeroProbabilityError, match="mpe: the evidence of rows"):
            circuit.mpe(xt, mt, wt)
    if not possible.any():
        return
    keep = torch.as_tensor(possible)
    decoded = circuit.mpe(xt[keep], mt[keep], None if wt is None else wt[keep]).numpy()
    np.testing.assert_array_equal(decoded[~missing[possible]], x[possible][~missing[possible]])
    value = np.exp(reference.log_prob(root, decoded, None, None if weights is None else weights[possible]))
    np.testing.assert_allclose(value, best[possible], rtol=1e-9)


@given(circuits(), st.data())
def test_mpe_maximises_the_max_product_value_on_any_circuit(root, data):
    """On non-deterministic circuits MPE is max-product decoding: the decoded completion
    maximises the value of the best latent choices (brute force over completions)."""
    x, missing, weights = data.draw(evidence(root, batch=4))
    best = reference.mpe(root, x, missing, weights)
    possible = np.isfinite(best.log_value)
    if not possible.any():
        return
    circuit = pc.compile(root, dtype=torch.float64)
    w = None if weights is None else weights[possible]
    xt, mt, wt = _tensors(x[possible], missing[possible], w)
    decoded = circuit.mpe(xt, mt, wt).numpy()
    value = reference.log_prob(root, decoded, None, w, max_product=True)
    np.testing.assert_allclose(value, best.log_value[possible], rtol=1e-9)
    # The enumeration's best value is the max-product value of the whole evidence.
    np.testing.assert_allclose(reference.log_prob(root, x[possible], missing[possible], w, max_product=True),
                               best.log_value[possible], rtol=1e-12)


@given(deterministic_circuits())
def test_deterministic_circuits_are_valid_distributions(root):
    _, probs = reference.distribution(root)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_mpe_with_nothing_missing_returns_x():
    root = pc.structures.hmm(3, 2, 2, seed=1)
    circuit = pc.compile(root, dtype=torch.float64)
    x = torch.tensor([[0, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(circuit.mpe(x), x)


def test_queries_accept_float_x_for_discrete_circuits():
    root = pc.structures.hmm(3, 2, 3, seed=2)
    circuit = pc.compile(root, dtype=torch.float64)
    x = torch.tensor([[0, 2, 1]])
    torch.testing.assert_close(circuit.log_prob(x.double()), circuit.log_prob(x))


def test_log_prob_gradient_of_soft_evidence_is_posterior():
    root = pc.structures.hmm(4, 3, 3, seed=3)
    circuit = pc.compile(root, dtype=torch.float64)
    x = torch.tensor([[0, 2, 1, 0]])
    missing = torch.tensor([[False, True, True, False]])
    weights = torch.randn(1, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights.requires_grad_(True)
    circuit.log_prob(x, missing, weights).sum().backward()
    torch.testing.assert_close(weights.grad, circuit.posterior(x, missing, weights.detach()))


def test_parameter_gradients_match_finite_differences():
    root = pc.structures.hmm(3, 2, 2, seed=4)
    circuit = pc.compile(root, dtype=torch.float64)
    x = torch.tensor([[0, 1, 1], [1, 1, 0]])
    missing = torch.tensor([[False, True, False], [False, False, False]])
    for key, param in circuit.named_parameters():
        def objective(value, param=param):
            with torch.no_grad():
                old = param.clone()
                param.copy_(value)
                out = circuit.log_prob(x, missing).sum()
                param.copy_(old)
            return out
        circuit.zero_grad()
        circuit.log_prob(x, missing).sum().backward()
        grad = param.grad.clone()
        numeric = torch.zeros_like(param)
        eps = 1e-6
        for index in np.ndindex(*param.shape):
            bump = torch.zeros_like(param)
            bump[index] = eps
            numeric[index] = (objective(param.detach() + bump) - objective(param.detach() - bump)) / (2 * eps)
        torch.testing.assert_close(grad, numeric, atol=1e-6, rtol=1e-5)


def _gaussian_mixture() -> pc.NodeGroup:
    gauss = pc.inputs(0, 2, pc.Gaussian(), params={"mean": [-1.0, 2.0], "std": [0.5, 2.0]})
    cat = pc.inputs(1, 2, pc.Categorical(3), params={"probs": [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]})
    return pc.summate(pc.multiply(gauss, cat), num_nodes=1, params=[[0.4, 0.6]])


def test_gaussian_log_prob_marginal_and_mpe_match_the_reference():
    root = _gaussian_mixture()
    circuit = pc.compile(root, dtype=torch.float64)
    x = np.array([[-0.7, 0.0], [2.5, 2.0], [0.3, 1.0]])
    result = circuit.log_prob(torch.as_tensor(x)).detach().numpy()
    np.testing.assert_allclose(result, reference.log_prob(root, x), rtol=1e-12)
    # Summing out the category leaves the Gaussian mixture density.
    missing = torch.tensor([[False, True]] * 3)
    mixture = 0.4 * np.exp(reference.log_prob(pc.inputs(0, 1, pc.Gaussian(), params={"mean": [-1.0], "std": [0.5]}), x[:, :1])) \
        + 0.6 * np.exp(reference.log_prob(pc.inputs(0, 1, pc.Gaussian(), params={"mean": [2.0], "std": [2.0]}), x[:, :1]))
    np.testing.assert_allclose(circuit.log_prob(torch.as_tensor(x), missing).detach().numpy(), np.log(mixture), rtol=1e-12)
    # Integrating the Gaussian out leaves the mixture of categoricals.
    missing = torch.tensor([[True, False]] * 3)
    cats = 0.4 * np.array([0.7, 0.2, 0.1]) + 0.6 * np.array([0.1, 0.3, 0.6])
    np.testing.assert_allclose(circuit.log_prob(torch.as_tensor(x), missing).detach().numpy(),
                               np.log(cats[x[:, 1].astype(int)]), rtol=1e-12)
    # MPE of the Gaussian given the category: the mean of the component with the largest
    # weight * p(category) * peak density.
    decoded = circuit.mpe(torch.as_tensor(x), missing).numpy()
    for row, k in enumerate(x[:, 1].astype(int)):
        scores = np.array([0.4 * [0.7, 0.2, 0.1][k] / 0.5, 0.6 * [0.1, 0.3, 0.6][k] / 2.0])
        assert decoded[row, 0] == [-1.0, 2.0][int(np.argmax(scores))]
        assert decoded[row, 1] == x[row, 1]


def test_empty_batch_through_nested_products_and_single_child_sums():
    """Found by pclayer.testing.strategies.circuits: an empty batch crashed the scaled path."""
    a, b = pc.inputs(0, 1, pc.Categorical(2)), pc.inputs(3, 1, pc.Categorical(3))
    c, d = pc.inputs(1, 1, pc.Categorical(2)), pc.inputs(2, 1, pc.Categorical(3))
    product = pc.multiply(pc.multiply(a, b), c, d)
    root = pc.summate(pc.summate(product, num_nodes=1), num_nodes=1)
    circuit = pc.compile(root, dtype=torch.float64)
    assert circuit.log_prob(torch.zeros(0, 4, dtype=torch.long)).shape == (0,)
