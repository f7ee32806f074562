"""Top-k sparse soft evidence: every query equals the same query with the equivalent dense evidence."""

from __future__ import annotations

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from pclayer.testing.strategies import circuits


@st.composite
def topk_cases(draw, hmm: bool = False):
    """(circuit, x, missing, TopKEvidence, dense equivalent (B, V, K)) with observed values
    among their variable's finite candidates (so every row has positive probability)."""
    if hmm:
        num_vars, cats = draw(st.integers(1, 4)), draw(st.integers(2, 6))
        root = pc.structures.hmm(num_vars, draw(st.integers(1, 3)), cats, seed=draw(st.integers(0, 1000)))
    else:
        root = draw(circuits())
    circuit = pc.compile(root, dtype=torch.float64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    var_cats = circuit.var_cats.tolist()
    batch, num_vars, num_cats = 3, circuit.num_vars, circuit.num_cats
    k = draw(st.integers(1, min(var_cats)))
    indices = np.stack([np.stack([rng.permutation(c)[:k] for c in var_cats]) for _ in range(batch)])
    values = rng.normal(size=(batch, num_vars, k))
    values[:, :, 1:][rng.random((batch, num_vars, k - 1)) < 0.2] = -np.inf  # the first candidate stays finite
    free = rng.random((batch, num_vars)) < 0.3 if draw(st.booleans()) else None
    missing = rng.random((batch, num_vars)) < 0.5
    x = np.where(free if free is not None else False, rng.integers(0, 2, size=(batch, num_vars)), indices[:, :, 0])
    dense = np.full((batch, num_vars, num_cats), -np.inf)
    for b in range(batch):
        for i in range(num_vars):
            if free is not None and free[b, i]:
                dense[b, i, : var_cats[i]] = 0.0
            else:
                dense[b, i, indices[b, i]] = values[b, i]
    free_t = None if free is None else torch.as_tensor(free)
    topk = pc.TopKEvidence(torch.as_tensor(values), torch.as_tensor(indices, dtype=torch.int64), free_t)
    return circuit, torch.as_tensor(x), torch.as_tensor(missing), topk, torch.as_tensor(dense)


def _equal_with_inf(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, equal_nan=False)


@given(st.one_of(topk_cases(), topk_cases(hmm=True)))
def test_log_prob_and_gradients_equal_the_dense_evidence(case):
    circuit, x, missing, topk, dense = case
    values = topk.values.clone().requires_grad_(True)
    dense_w = dense.clone().requires_grad_(True)
    sparse_lp = circuit.log_prob(x, missing=missing, soft_evidence=pc.TopKEvidence(values, topk.indices, topk.free))
    sparse_lp.sum().backward()
    sparse_param_grads = [p.grad.clone() for p in circuit.params.values()]
    circuit.zero_grad()
    dense_lp = circuit.log_prob(x, missing=missing, soft_evidence=dense_w)
    dense_lp.sum().backward()
    _equal_with_inf(sparse_lp.detach(), dense_lp.detach())
    with torch.no_grad():  # cached tables: the second call reads candidate rows of the transposed linear tables
        for _ in range(2):
            _equal_with_inf(circuit.log_prob(x, missing=missing, soft_evidence=topk), dense_lp.detach())
    expected = dense_w.grad.gather(-1, topk.indices)
    if topk.free is not None:
        expected = torch.where(topk.free.unsqueeze(-1), torch.zeros_like(expected), expected)
    _equal_with_inf(values.grad, expected)
    for sparse_grad, p in zip(sparse_param_grads, circuit.params.values()):
        _equal_with_inf(sparse_grad, p.grad)


@given(st.one_of(topk_cases(), topk_cases(hmm=True)))
def test_posterior_sample_and_mpe_equal_the_dense_evidence(case):
    circuit, x, missing, topk, dense = case
    assume(bool(torch.isfinite(circuit.log_prob(x, missing=missing, soft_evidence=dense)).all()))  # indicator leaves can rule x out
    _equal_with_inf(circuit.posterior(x, missing, topk), circuit.posterior(x, missing, dense))
    sparse = circuit.sample(x=x, missing=missing, soft_evidence=topk, generator=torch.Generator().manual_seed(1), return_nodes=True)
    full = circuit.sample(x=x, missing=missing, soft_evidence=dense, generator=torch.Generator().manual_seed(1), return_nodes=True)
    assert torch.equal(sparse.x, full.x) and torch.equal(sparse.node, full.node)
    _equal_with_inf(sparse.node_log_probs, full.node_log_probs)
    assert torch.equal(circuit.mpe(x, missing, topk), circuit.mpe(x, missing, dense))


def test_sampling_without_x_expands_a_single_row():
    circuit = pc.compile(pc.structures.hmm(3, 2, 5, seed=0), dtype=torch.float64)
    topk = pc.TopKEvidence(torch.zeros(1, 3, 2), torch.tensor([[[4, 1], [0, 2], [3, 4]]]))
    drawn = circuit.sample(soft_evidence=topk, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (1, 3)
    x = torch.zeros(1, 3, dtype=torch.long)
    many = circuit.sample(50, x=x, missing=torch.ones(1, 3, dtype=torch.bool), soft_evidence=topk,
                          generator=torch.Generator().manual_seed(0))
    allowed = [{1, 4}, {0, 2}, {3, 4}]
    assert many.shape == (50, 3) and all(int(many[r, i]) in allowed[i] for r in range(50) for i in range(3))


def test_posterior_is_zero_outside_the_candidates():
    circuit = pc.compile(pc.structures.hmm(4, 3, 7, seed=1), dtype=torch.float64)
    indices = torch.tensor([[[6, 0, 3]] * 4])
    post = circuit.posterior(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool),
                             pc.TopKEvidence(torch.randn(1, 4, 3, dtype=torch.float64), indices))
    outside = torch.ones(7, dtype=torch.bool)
    outside[[0, 3, 6]] = False
    assert bool((post[..., outside] == 0).all())
    torch.testing.assert_close(post.sum(-1), torch.ones(1, 4, dtype=torch.float64))


@pytest.fixture
def circuit():
    return pc.compile(pc.structures.hmm(3, 2, 4, seed=0))


X = torch.zeros(2, 3, dtype=torch.long)


def _topk(values=None, indices=None, free=None):
    values = torch.zeros(2, 3, 2) if values is None else values
    indices = torch.tensor([[[0, 1]] * 3] * 2) if indices is None else indices
    return pc.TopKEvidence(values, indices, free)


@pytest.mark.parametrize(("evidence", "error", "pattern"), [
    (_topk(values=torch.zeros(2, 3, 2, dtype=torch.long)), TypeError, r"soft_evidence.values: expected a float tensor"),
    (_topk(values=torch.zeros(2, 2, 2)), ValueError, r"soft_evidence.values: expected shape \(B, num_vars, k\) = \(2, 3, k >= 1\), got \(2, 2, 2\)"),
    (_topk(values=torch.zeros(2, 3, 0), indices=torch.zeros(2, 3, 0, dtype=torch.long)), ValueError, r"soft_evidence.values: expected shape"),
    (_topk(indices=torch.zeros(2, 3, 2, dtype=torch.int32)), TypeError, r"soft_evidence.indices: expected an int64 tensor"),
    (_topk(indices=torch.zeros(2, 3, 1, dtype=torch.long)), ValueError, r"soft_evidence.indices: expected shape \(2, 3, 2\)"),
    (_topk(values=torch.tensor([[[0.0, float("nan")]] * 3] * 2)), ValueError, r"soft_evidence.values: NaN at \(0, 0, 1\)"),
    (_topk(values=torch.tensor([[[0.0, float("inf")]] * 3] * 2)), ValueError, r"soft_evidence.values: \+inf"),
    (_topk(indices=torch.tensor([[[0, 4]] * 3] * 2)), ValueError, r"category 4 at \(0, 0, 1\) is out of range \[0, 4\) of variable 0"),
    (_topk(indices=torch.tensor([[[-1, 0]] * 3] * 2)), ValueError, r"category -1 .* out of range"),
    (_topk(indices=torch.tensor([[[2, 2]] * 3] * 2)), ValueError, r"category 2 is listed twice for row 0, variable 0"),
    (_topk(free=torch.zeros(2, 3)), TypeError, r"soft_evidence.free: expected a bool tensor of shape \(2, 3\)"),
    (_topk(free=torch.zeros(2, 2, dtype=torch.bool)), ValueError, r"soft_evidence.free: expected shape \(2, 3\)"),
])
def test_bad_topk_evidence_is_rejected_with_a_clear_error(circuit, evidence, error, pattern):
    for query in (circuit.log_prob, circuit.posterior, circuit.mpe):
        with pytest.raises(error, match=pattern):
            query(X, soft_evidence=evidence)
    with pytest.raises(error, match=pattern):
        circuit.sample(x=X, soft_evidence=evidence)


def test_topk_evidence_on_a_gaussian_circuit_is_rejected():
    root = pc.multiply(pc.inputs(0, 1, pc.Gaussian()), pc.inputs(1, 1, pc.Categorical(3)))
    circuit = pc.compile(root)
    with pytest.raises(ValueError, match="TopKEvidence needs an all-discrete circuit"):
        circuit.log_prob(torch.zeros(1, 2), soft_evidence=pc.TopKEvidence(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1, dtype=torch.long)))
