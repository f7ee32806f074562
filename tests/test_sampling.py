"""Exact sampling: chi-square goodness of fit against brute-force probabilities."""

from __future__ import annotations

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from pclayer.inspection import describe
from pclayer.queries.evidence import prepare
from pclayer.representations import SCALED
from pclayer.testing import reference
from pclayer.testing.strategies import circuits, evidence

pytestmark = pytest.mark.usefixtures("both_programs")  # every property, optimised and plain

NUM_SAMPLES = 20000
P_MIN = 1e-3


def _small_circuit() -> pc.NodeGroup:
    """Three variables (2, 3, 2 categories) with a dense and a sparse sum, products with
    default and explicit edges, a shared group, tied leaves, and all three discrete leaf kinds."""
    generator = torch.Generator().manual_seed(0)
    a = pc.inputs(0, 2, pc.Categorical(2), generator=generator)
    b = pc.inputs(1, 3, pc.Categorical(3), generator=generator)
    b_ind = pc.inputs(1, 2, pc.Indicator(3, values=(2, 0)))
    c = pc.inputs(2, 2, pc.Bernoulli(), generator=generator)
    c_tied = pc.inputs(2, 2, pc.Bernoulli(), tie=c)
    bc = pc.multiply(b, c_tied, edges=[[0, 1], [1, 0], [2, 1]])
    bc_mix = pc.summate(bc, pc.multiply(b_ind, c), num_nodes=2,
                        edges=[[0, 0, 1, 1, 1], [0, 3, 1, 2, 4]], generator=generator)
    top = pc.multiply(a, bc_mix)
    other = pc.multiply(a, bc_mix, edges=[[1, 0], [0, 1]])
    return pc.summate(top, other, num_nodes=1, generator=generator)


def _hmm() -> pc.NodeGroup:
    return pc.structures.hmm(3, 3, 3, seed=4)


def _conditional(assignments: np.ndarray, probs: np.ndarray, x: np.ndarray, missing: np.ndarray,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """(A,) the distribution of the enumerated joint given one row of evidence: x (V,),
    missing (V,) and soft-evidence log-weights (V, K)."""
    consistent = np.all((assignments == x[None]) | missing[None], axis=1)
    weighted = probs.copy()
    if weights is not None:
        weighted = weighted * np.exp(weights[np.arange(assignments.shape[1]), assignments].sum(1))
    weighted = np.where(consistent, weighted, 0.0)
    return weighted / weighted.sum()


def _counts(samples: np.ndarray, var_cats: list[int]) -> np.ndarray:
    flat = np.ravel_multi_index(tuple(samples.T), tuple(var_cats))
    return np.bincount(flat, minlength=int(np.prod(var_cats)))


def _assert_fits(samples: np.ndarray, probs: np.ndarray, var_cats: list[int]) -> None:
    """Chi-square test of samples (N, V) against exact probabilities of all assignments."""
    counts = _counts(samples, var_cats)
    support = probs > 0
    assert counts[~support].sum() == 0, "samples fell on assignments of probability zero"
    expected = probs[support] / probs[support].sum() * len(samples)
    p_value = stats.chisquare(counts[support], expected).pvalue
    assert p_value > P_MIN, f"chi-square p-value {p_value:.2e}"


@pytest.fixture(params=["small", "hmm"])
def root(request) -> pc.NodeGroup:
    return _small_circuit() if request.param == "small" else _hmm()


def test_unconditional_samples_follow_the_distribution(root):
    assignments, probs = reference.distribution(root)
    circuit = pc.compile(root, dtype=torch.float64)
    samples = circuit.sample(NUM_SAMPLES, generator=torch.Generator().manual_seed(1)).numpy()
    _assert_fits(samples, probs, list(describe(root).var_cats))


def test_conditional_samples_follow_the_conditional_distribution(root):
    assignments, probs = reference.distribution(root)
    var_cats = list(describe(root).var_cats)
    x = np.array([1] + [0] * (len(var_cats) - 1))
    missing = np.ones(len(var_cats), dtype=bool)
    missing[0] = False
    circuit = pc.compile(root, dtype=torch.float64)
    samples = circuit.sample(NUM_SAMPLES, x=torch.as_tensor(x)[None], missing=torch.as_tensor(missing)[None],
                             generator=torch.Generator().manual_seed(2)).numpy()
    np.testing.assert_array_equal(samples[:, ~missing], np.broadcast_to(x[~missing], (NUM_SAMPLES, (~missing).sum())))
    _assert_fits(samples, _conditional(assignments, probs, x, missing), var_cats)


def test_soft_evidence_samples_follow_the_weighted_distribution(root):
    assignments, probs = reference.distribution(root)
    var_cats = list(describe(root).var_cats)
    circuit = pc.compile(root, dtype=torch.float64)
    weights = np.random.default_rng(3).normal(size=(len(var_cats), circuit.num_cats)) * 1.5
    soft = torch.as_tensor(weights)[None].expand(NUM_SAMPLES, -1, -1)
    # Without num_samples the batch size comes from the soft evidence.
    samples = circuit.sample(soft_evidence=soft, generator=torch.Generator().manual_seed(3)).numpy()
    assert samples.shape == (NUM_SAMPLES, len(var_cats))
    x = np.zeros(len(var_cats), dtype=np.int64)
    _assert_fits(samples, _conditional(assignments, probs, x, np.ones_like(x, dtype=bool), weights), var_cats)


def test_conditional_soft_evidence_samples(root):
    assignments, probs = reference.distribution(root)
    var_cats = list(describe(root).var_cats)
    circuit = pc.compile(root, dtype=torch.float32)
    rng = np.random.default_rng(4)
    weights = rng.normal(size=(len(var_cats), circuit.num_cats))
    x = np.zeros(len(var_cats), dtype=np.int64)
    missing = np.ones(len(var_cats), dtype=bool)
    missing[1] = False
    samples = circuit.sample(NUM_SAMPLES, x=torch.as_tensor(x)[None], missing=torch.as_tensor(missing)[None],
                             soft_evidence=torch.as_tensor(weights, dtype=torch.float32)[None],
                             generator=torch.Generator().manual_seed(5)).numpy()
    _assert_fits(samples, _conditional(assignments, probs, x, missing, weights), var_cats)


def _mixed_circuit() -> pc.NodeGroup:
    """A sum over two very different input nodes of variable 1, times variable 0 and a
    two-variable HMM over variables 2 and 3: evidence far below the float32 range on
    variable 1 sends the input layer (which the sum reads) to log space."""
    probs = torch.tensor([[0.8, 0.15, 0.05], [0.05, 0.15, 0.8]], dtype=torch.float64)
    a = pc.inputs(0, 1, pc.Categorical(3), generator=torch.Generator().manual_seed(1))
    b = pc.inputs(1, 2, pc.Categorical(3), params={"probs": probs})
    mixture = pc.summate(b, num_nodes=1, generator=torch.Generator().manual_seed(2))
    c = pc.inputs(2, 2, pc.Categorical(3), generator=torch.Generator().manual_seed(3))
    d = pc.inputs(3, 2, pc.Categorical(3), generator=torch.Generator().manual_seed(4))
    chain = pc.summate(pc.multiply(c, d), num_nodes=1, generator=torch.Generator().manual_seed(5))
    return pc.multiply(a, mixture, chain)


@pytest.mark.parametrize("shared_row", [True, False])
def test_samples_are_exact_where_some_layers_fell_back_to_log_space(shared_row):
    """The top-down pass chooses from log-values in the layers that fell back to log space and
    from linear weights in the others (draws sharing one row of evidence, or one row per draw)."""
    root = _mixed_circuit()
    assignments, probs = reference.distribution(root)
    var_cats = list(describe(root).var_cats)
    circuit = pc.compile(root, dtype=torch.float32)
    weights = np.random.default_rng(6).normal(size=(len(var_cats), circuit.num_cats))
    weights[1] -= 95.0  # exp(-95) ~ 5e-42: below the float32 floor, relative differences intact
    soft = torch.as_tensor(weights, dtype=torch.float32)[None]
    x = torch.zeros(1, len(var_cats), dtype=torch.long)
    missing = torch.ones_like(x, dtype=torch.bool)
    ev = prepare(circuit, x, missing, soft)
    with torch.no_grad():
        values = circuit.evaluate(SCALED, ev.x, ev.missing, ev.soft_evidence, keep=True)
    assert 0 in values.logged and len(values.logged) < len(circuit.layers), "expected a mix of log and linear layers"
    if not shared_row:
        x, missing, soft = x.expand(NUM_SAMPLES, -1), missing.expand(NUM_SAMPLES, -1), soft.expand(NUM_SAMPLES, -1, -1)
    samples = circuit.sample(NUM_SAMPLES, x=x, missing=missing, soft_evidence=soft,
                             generator=torch.Generator().manual_seed(6)).numpy()
    _assert_fits(samples, _conditional(assignments, probs, x[0].numpy(), missing[0].numpy(), weights), var_cats)


def _input_node_map(circuit: pc.TensorCircuit) -> tuple[np.ndarray, list[np.ndarray]]:
    """Variable of every input-layer node and its normalised log-probability row."""
    tables = circuit.log_tables()
    node_var, rows = [], []
    for bucket in circuit.plan.layers[0].buckets:
        table = tables[bucket.key].detach().numpy()
        for bank, var in zip(bucket.group_bank.tolist(), bucket.group_var.tolist()):
            for j in range(bucket.num_nodes):
                node_var.append(var)
                rows.append(table[bank, j])
    return np.array(node_var), rows


def test_return_nodes_gives_a_consistent_input_node_per_variable(root):
    circuit = pc.compile(root, dtype=torch.float64)
    result = circuit.sample(NUM_SAMPLES, generator=torch.Generator().manual_seed(6), return_nodes=True)
    assert isinstance(result, pc.SampleResult)
    x, node, node_logp = (t.numpy() for t in result)
    node_var, rows = _input_node_map(circuit)
    var_cats = list(describe(root).var_cats)
    assert node.shape == x.shape and node_logp.shape == (*x.shape, circuit.num_cats)
    np.testing.assert_array_equal(node_var[node], np.broadcast_to(np.arange(len(var_cats)), x.shape))
    for v, k in enumerate(var_cats):
        table = np.stack([rows[n] for n in node[:, v]])
        np.testing.assert_allclose(node_logp[:, v, :k], table)
        assert np.all(node_logp[:, v, k:] == -np.inf)
        np.testing.assert_allclose(np.exp(node_logp[:, v, :k]).sum(-1), 1.0)
        # Each value was drawn from its node's distribution: a chi-square test per node.
        for n in np.unique(node[:, v]):
            chosen = node[:, v] == n
            if chosen.sum() < 500:
                continue
            counts = np.bincount(x[chosen, v], minlength=k)
            probs = np.exp(rows[n])
            assert counts[probs == 0].sum() == 0
            if (probs > 0).sum() < 2:
                continue
            expected = probs[probs > 0] * chosen.sum()
            assert stats.chisquare(counts[probs > 0], expected).pvalue > P_MIN


def test_node_log_probs_at_categories_gather_the_full_rows(root):
    """``node_log_probs_at`` reads only the asked categories of each chosen node: equal to the
    full rows gathered, ``-inf`` for categories beyond a variable's own."""
    circuit = pc.compile(root, dtype=torch.float64)
    result = circuit.sample(50, generator=torch.Generator().manual_seed(7), return_nodes=True)
    categories = torch.randint(0, circuit.num_cats, (50, circuit.num_vars, 4), generator=torch.Generator().manual_seed(8))
    full = result.node_log_probs
    torch.testing.assert_close(result.node_log_probs_at(categories), full.gather(-1, categories))
    assert torch.equal(result.node_log_probs_at(None), full)
    with pytest.raises(ValueError, match="categories: expected an int64 tensor of shape"):
        result.node_log_probs_at(categories[:, :1])


def test_node_log_probs_of_reads_the_asked_rows(root):
    """``node_log_probs_of(draws, variables)`` equals those rows of ``node_log_probs``, into a
    given buffer too, and names a bad argument."""
    circuit = pc.compile(root, dtype=torch.float64)
    result = circuit.sample(20, generator=torch.Generator().manual_seed(7), return_nodes=True)
    draws = torch.tensor([0, 5, 5, 19])
    variables = torch.tensor([0, circuit.num_vars - 1, 0, 1 % circuit.num_vars])
    full = result.node_log_probs
    assert torch.equal(result.node_log_probs_of(draws, variables), full[draws, variables])
    buffer = torch.empty(4, circuit.num_cats, dtype=torch.float64)
    assert result.node_log_probs_of(draws, variables, out=buffer) is buffer
    assert torch.equal(buffer, full[draws, variables])
    with pytest.raises(ValueError, match=r"draws: expected indices in \[0, 20\)"):
        result.node_log_probs_of(torch.tensor([20]), torch.tensor([0]))
    with pytest.raises(ValueError, match="variables: expected a 1-d int64 tensor"):
        result.node_log_probs_of(draws, variables.int())
    with pytest.raises(ValueError, match="out: expected a torch.float64 tensor of shape"):
        result.node_log_probs_of(draws, variables, out=buffer[:2])


def test_sampling_is_reproducible_with_a_generator():
    circuit = pc.compile(_small_circuit())
    first = circuit.sample(50, generator=torch.Generator().manual_seed(9))
    second = circuit.sample(50, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(first, second)


def test_gaussian_leaf_samples_have_the_right_mean_and_std():
    gauss = pc.inputs(0, 1, pc.Gaussian(), params={"mean": [1.5], "std": [0.7]})
    cat = pc.inputs(1, 1, pc.Categorical(2), params={"probs": [[0.3, 0.7]]})
    circuit = pc.compile(pc.multiply(gauss, cat), dtype=torch.float64)
    samples = circuit.sample(NUM_SAMPLES, generator=torch.Generator().manual_seed(7)).numpy()
    values = samples[:, 0]
    assert abs(values.mean() - 1.5) < 5 * 0.7 / np.sqrt(NUM_SAMPLES)
    assert values.std() == pytest.approx(0.7, rel=0.03)
    assert stats.kstest(values, "norm", args=(1.5, 0.7)).pvalue > P_MIN


def test_gaussian_mixture_samples_and_conditionals():
    means, stds, mix = np.array([-2.0, 3.0]), np.array([0.5, 1.5]), np.array([0.25, 0.75])
    gauss = pc.inputs(0, 2, pc.Gaussian(), params={"mean": means, "std": stds})
    cat = pc.inputs(1, 2, pc.Categorical(3), params={"probs": [[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]})
    root = pc.summate(pc.multiply(gauss, cat), num_nodes=1, params=mix[None])
    circuit = pc.compile(root, dtype=torch.float64)
    samples = circuit.sample(NUM_SAMPLES, generator=torch.Generator().manual_seed(8)).numpy()
    mean = (mix * means).sum()
    std = np.sqrt((mix * (stds**2 + means**2)).sum() - mean**2)
    assert abs(samples[:, 0].mean() - mean) < 5 * std / np.sqrt(NUM_SAMPLES)
    assert samples[:, 0].std() == pytest.approx(std, rel=0.03)
    # Conditioned on the Gaussian value, the category follows p(x1 | x0) from the symbolic reference.
    x = torch.tensor([[0.4, 0.0]], dtype=torch.float64)
    missing = torch.tensor([[False, True]])
    conditional = circuit.sample(NUM_SAMPLES, x=x, missing=missing, generator=torch.Generator().manual_seed(9)).numpy()
    assert np.all(conditional[:, 0] == 0.4)
    joint = np.exp(reference.log_prob(root, np.array([[0.4, k] for k in range(3)])))
    counts = np.bincount(conditional[:, 1].astype(np.int64), minlength=3)
    assert stats.chisquare(counts, joint / joint.sum() * NUM_SAMPLES).pvalue > P_MIN
    # And the Gaussian given the category is the posterior mixture.
    x = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    given = circuit.sample(NUM_SAMPLES, x=x, missing=torch.tensor([[True, False]]),
                           generator=torch.Generator().manual_seed(10)).numpy()[:, 0]
    weights = mix * np.array([0.1, 0.7])
    weights = weights / weights.sum()
    cdf = lambda v: (weights * stats.norm.cdf((v - means) / stds)).sum()  # noqa: E731
    assert stats.kstest(given, np.vectorize(cdf)).pvalue > P_MIN


@given(circuits(), st.data())
def test_samples_of_random_circuits_are_possible_and_keep_observed_values(root, data):
    """Every draw has positive weighted probability, keeps the observed entries, and each
    variable comes from an input node of that variable that supports the drawn value."""
    var_cats = list(describe(root).var_cats)
    x, missing, weights = data.draw(evidence(root, batch=4))
    possible = reference.log_prob(root, x, missing, weights) > -np.inf
    if not possible.any():
        return
    x, missing = x[possible], missing[possible]
    weights = None if weights is None else weights[possible]
    circuit = pc.compile(root, dtype=torch.float64)
    reps = 50
    result = circuit.sample(x=torch.as_tensor(np.repeat(x, reps, 0)), missing=torch.as_tensor(np.repeat(missing, reps, 0)),
                            soft_evidence=None if weights is None else torch.as_tensor(np.repeat(weights, reps, 0)),
                            generator=torch.Generator().manual_seed(0), return_nodes=True)
    samples, node, node_logp = (t.numpy() for t in result)
    rows_missing = np.repeat(missing, reps, 0)
    np.testing.assert_array_equal(samples[~rows_missing], np.repeat(x, reps, 0)[~rows_missing])
    values = np.exp(reference.log_prob(root, samples, None, None if weights is None else np.repeat(weights, reps, 0)))
    assert np.all(values > 0)
    node_var, _ = _input_node_map(circuit)
    np.testing.assert_array_equal(node_var[node], np.broadcast_to(np.arange(len(var_cats)), samples.shape))
    picked = np.take_along_axis(node_logp, samples[..., None], axis=-1)[..., 0]
    assert np.all(picked > -np.inf)


@given(circuits(), st.data())
def test_draws_under_one_shared_row_equal_draws_under_the_repeated_row(root, data):
    """``sample(n, x=row)`` runs the bottom-up pass once for the shared row; with the same
    generator it draws exactly what the row repeated n times draws."""
    x, missing, weights = data.draw(evidence(root, batch=1))
    if not reference.log_prob(root, x, missing, weights)[0] > -np.inf:
        return
    circuit = pc.compile(root, dtype=torch.float64)
    row = [None if a is None else torch.as_tensor(a) for a in (x, missing, weights)]
    repeated = [None if a is None else a.expand(7, *a.shape[1:]) for a in row]
    shared = circuit.sample(7, x=row[0], missing=row[1], soft_evidence=row[2],
                            generator=torch.Generator().manual_seed(3), return_nodes=True)
    apart = circuit.sample(x=repeated[0], missing=repeated[1], soft_evidence=repeated[2],
                           generator=torch.Generator().manual_seed(3), return_nodes=True)
    for a, b in zip(shared, apart):
        assert torch.equal(a, b)


def test_draws_under_one_shared_row_of_topk_evidence_equal_draws_under_the_repeated_row():
    circuit = pc.compile(pc.structures.hmm(6, 3, 5, seed=2), dtype=torch.float64)
    values = torch.randn(1, 6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    indices = torch.tensor([[[0, 3], [1, 2], [4, 0], [2, 3], [1, 4], [0, 1]]])
    free = torch.tensor([[False, True, False, False, True, False]])
    x = torch.tensor([[0, 1, 0, 2, 0, 0]])
    missing = torch.tensor([[True, True, False, True, True, True]])
    evidence = pc.TopKEvidence(values, indices, free)
    shared = circuit.sample(40, x=x, missing=missing, soft_evidence=evidence, generator=torch.Generator().manual_seed(1))
    apart = circuit.sample(x=x.expand(40, -1), missing=missing.expand(40, -1), soft_evidence=evidence.expand(40),
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(shared, apart)
    unconditional = circuit.sample(40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(unconditional, circuit.sample(x=torch.zeros(40, 6, dtype=torch.long), missing=torch.ones(40, 6, dtype=torch.bool),
                                                     generator=torch.Generator().manual_seed(2)))
