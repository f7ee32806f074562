"""EM from circuit flows: Baum-Welch, monotonicity, missing values, soft evidence,
weights, ties and Gaussian leaves, each against an independent computation."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pclayer as pc
from pclayer.learn import FullBatchEM, MiniBatchEM, compute_flows, m_step

pytestmark = pytest.mark.usefixtures("both_programs")  # every property, optimised and plain

F64 = torch.float64


def _softmax_rows(rng: np.random.Generator, *shape: int) -> np.ndarray:
    raw = rng.random(shape) + 0.1
    return raw / raw.sum(-1, keepdims=True)


def baum_welch(x: np.ndarray, initial: np.ndarray, transition: np.ndarray, emission: np.ndarray):
    """One Baum-Welch step (scaled forward-backward) for a homogeneous HMM."""
    gamma_sum0, xi_sum, emit_sum = baum_welch_counts(x, initial, transition, emission)
    return (gamma_sum0 / gamma_sum0.sum(), xi_sum / xi_sum.sum(1, keepdims=True), emit_sum / emit_sum.sum(1, keepdims=True))


def baum_welch_counts(x: np.ndarray, initial: np.ndarray, transition: np.ndarray, emission: np.ndarray):
    """Expected counts (initial state, transitions, emissions) of the rows ``x`` by forward-backward."""
    n, t_len = x.shape
    h = initial.shape[0]
    gamma_sum0 = np.zeros(h)
    xi_sum = np.zeros((h, h))
    emit_sum = np.zeros_like(emission)
    for row in x:
        alpha = np.zeros((t_len, h))
        alpha[0] = initial * emission[:, row[0]]
        for t in range(1, t_len):
            alpha[t] = (alpha[t - 1] @ transition) * emission[:, row[t]]
        beta = np.ones((t_len, h))
        for t in range(t_len - 2, -1, -1):
            beta[t] = transition @ (emission[:, row[t + 1]] * beta[t + 1])
        likelihood = alpha[-1].sum()
        gamma = alpha * beta / likelihood
        gamma_sum0 += gamma[0]
        for t in range(t_len - 1):
            xi_sum += alpha[t][:, None] * transition * (emission[:, row[t + 1]] * beta[t + 1])[None, :] / likelihood
        for t in range(t_len):
            emit_sum[:, row[t]] += gamma[t]
    return gamma_sum0, xi_sum, emit_sum


def hmm_tables(circuit: pc.TensorCircuit, h: int, k: int):
    tables = {key: torch.exp(value).detach().numpy() for key, value in circuit.log_tables().items()}
    return tables[f"sum_1x{h}"][0, 0], tables[f"sum_{h}x{h}"][0], tables[f"cat_{h}x{k}"][0]


def test_one_em_step_on_an_hmm_equals_one_baum_welch_step():
    rng = np.random.default_rng(0)
    h, k, t_len = 3, 4, 6
    initial, transition, emission = _softmax_rows(rng, h), _softmax_rows(rng, h, h), _softmax_rows(rng, h, k)
    x = rng.integers(0, k, size=(40, t_len))
    circuit = pc.compile(pc.structures.hmm(t_len, h, k, initial=initial, transition=transition, emission=emission), dtype=F64)
    em = FullBatchEM(circuit)
    em.accumulate(torch.from_numpy(x[:25]))
    em.accumulate(torch.from_numpy(x[25:]))
    em.step()
    expected = baum_welch(x, initial, transition, emission)
    for got, want in zip(hmm_tables(circuit, h, k), expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_mini_batch_em_averages_expected_counts_with_the_step_size():
    rng = np.random.default_rng(1)
    h, k, t_len = 2, 3, 4
    initial, transition, emission = _softmax_rows(rng, h), _softmax_rows(rng, h, h), _softmax_rows(rng, h, k)
    x1, x2 = rng.integers(0, k, size=(30, t_len)), rng.integers(0, k, size=(20, t_len))
    circuit = pc.compile(pc.structures.hmm(t_len, h, k, initial=initial, transition=transition, emission=emission), dtype=F64)
    em = MiniBatchEM(circuit, step_size=0.25, pseudocount=0.0)
    em.step(torch.from_numpy(x1))  # the first step interpolates the parameters
    target = baum_welch(x1, initial, transition, emission)
    first = [0.75 * old + 0.25 * new for old, new in zip((initial, transition, emission), target)]
    for got, want in zip(hmm_tables(circuit, h, k), first):
        np.testing.assert_allclose(got, want, rtol=1e-10)
    em.step(torch.from_numpy(x2))  # later steps average expected counts, started at theta * node flow
    counts1 = baum_welch_counts(x1, initial, transition, emission)
    start = [theta * c.sum(-1, keepdims=True) for theta, c in zip((initial, transition, emission), counts1)]
    averaged = [0.75 * a + 0.25 * b for a, b in zip(start, counts1)]
    averaged = [0.75 * a + 0.25 * b for a, b in zip(averaged, baum_welch_counts(x2, *first))]
    expected = [c / c.sum(-1, keepdims=True) for c in averaged]
    for got, want in zip(hmm_tables(circuit, h, k), expected):
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_pseudocount_is_spread_evenly_over_children():
    circuit = pc.compile(pc.inputs(0, 1, pc.Categorical(4), params={"probs": [[0.1, 0.2, 0.3, 0.4]]}), dtype=F64)
    em = FullBatchEM(circuit, pseudocount=2.0)
    em.accumulate(torch.tensor([[0], [0], [3]]))
    em.step()
    probs = torch.exp(circuit.log_tables()["cat_1x4"])[0, 0]
    torch.testing.assert_close(probs, torch.tensor([2.5, 0.5, 0.5, 1.5], dtype=F64) / 5)


def _random_dag(seed: int, gaussian: bool) -> pc.NodeGroup:
    """A small hand-built circuit: shared sub-circuit, sparse and dense sums, tied groups."""
    g = torch.Generator().manual_seed(seed)
    last = pc.Gaussian() if gaussian else pc.Categorical(3)
    a = pc.inputs(0, 3, pc.Categorical(2), generator=g)
    b = pc.inputs(1, 3, pc.Categorical(3), generator=g)
    c = pc.inputs(2, 2, last, generator=g)
    c_tied = pc.inputs(2, 2, last, tie=c)
    ab = pc.multiply(a, b)
    s_ab = pc.summate(ab, num_nodes=2, generator=g)
    s_ab_sparse = pc.summate(ab, num_nodes=2, edges=[[0, 0, 1], [0, 2, 1]], generator=g)
    s_ab_tied = pc.summate(ab, num_nodes=2, tie=s_ab)
    left = pc.multiply(s_ab, c)
    mid = pc.multiply(s_ab_sparse, c_tied)
    right = pc.multiply(s_ab_tied, c, edges=[[1, 0], [0, 1]])
    return pc.summate(left, mid, right, num_nodes=1, generator=g)


def _data_for(circuit: pc.TensorCircuit, n: int, seed: int) -> torch.Tensor:
    return circuit.sample(n, generator=torch.Generator().manual_seed(seed)).to(circuit.dtype if circuit.has_continuous else torch.long)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), t_len=st.integers(2, 5), h=st.integers(1, 3), k=st.integers(2, 4),
       n=st.integers(1, 12), missing_rate=st.sampled_from([0.0, 0.3]))
def test_full_batch_em_never_decreases_the_likelihood_of_hmms(seed, t_len, h, k, n, missing_rate):
    circuit = pc.compile(pc.structures.hmm(t_len, h, k, seed=seed), dtype=F64)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, k, size=(n, t_len)))
    missing = torch.from_numpy(rng.random((n, t_len)) < missing_rate)
    em = FullBatchEM(circuit)
    history = []
    for _ in range(4):
        em.accumulate(x, missing)
        history.append(em.step())
    history.append(float(circuit.log_prob(x, missing).detach().mean()))
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(history)), history


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), gaussian=st.booleans(), pseudocount=st.sampled_from([0.0, 0.5]))
def test_full_batch_em_never_decreases_the_objective_on_hand_built_circuits(seed, gaussian, pseudocount):
    circuit = pc.compile(_random_dag(seed, gaussian), dtype=F64)
    x = _data_for(pc.compile(_random_dag(seed + 1, gaussian), dtype=F64), 20, seed)
    em = FullBatchEM(circuit, pseudocount=pseudocount)
    previous = -math.inf
    for _ in range(4):
        em.accumulate(x)
        ll = em.step()
        if pseudocount == 0:
            assert ll >= previous - 1e-9
        previous = ll
    if pseudocount == 0:
        assert float(circuit.log_prob(x).detach().mean()) >= previous - 1e-9


def _completions(circuit, x, missing, soft_evidence):
    """Every completion of the missing entries with its posterior weight (brute force)."""
    rows, weights = [], []
    cats = circuit.var_cats.tolist()
    for b in range(x.shape[0]):
        holes = missing[b].nonzero().flatten().tolist()
        options = []
        for values in itertools.product(*[range(cats[v]) for v in holes]):
            row = x[b].clone()
            row[holes] = torch.tensor(values, dtype=row.dtype)
            options.append(row)
        full = torch.stack(options)
        log_joint = circuit.log_prob(full).detach()
        if soft_evidence is not None:
            log_joint = log_joint + sum(soft_evidence[b, v, full[:, v]] for v in range(x.shape[1]))
        rows.append(full)
        weights.append(torch.softmax(log_joint, 0))
    return torch.cat(rows), torch.cat(weights)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_soft_evidence", [False, True])
def test_em_with_missing_values_equals_em_on_completed_expected_counts(seed, with_soft_evidence):
    circuit = pc.compile(_random_dag(seed, gaussian=False), dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x = _data_for(circuit, 6, seed)
    missing = torch.rand(x.shape, generator=g) < 0.4
    evidence = torch.randn(6, 3, circuit.num_cats, generator=g, dtype=F64) if with_soft_evidence else None
    full_x, full_w = _completions(circuit, x, missing, evidence)
    flows = compute_flows(circuit, x, missing=missing, soft_evidence=evidence)
    reference = compute_flows(circuit, full_x, weights=full_w)
    for key in flows.counts:
        torch.testing.assert_close(flows.counts[key], reference.counts[key], rtol=1e-9, atol=1e-11)
    twin = copy.deepcopy(circuit)
    m_step(circuit, flows)
    m_step(twin, reference)
    for key in circuit.params:
        torch.testing.assert_close(circuit.log_tables()[key], twin.log_tables()[key], rtol=1e-9, atol=1e-11)


def test_sample_weights_equal_repeated_rows():
    circuit = pc.compile(pc.structures.hmm(4, 2, 3, seed=3), dtype=F64)
    x = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0], [1, 0, 0, 2]])
    weighted = compute_flows(circuit, x, weights=torch.tensor([2.0, 0.0, 3.0], dtype=F64))
    repeated = compute_flows(circuit, x[[0, 0, 2, 2, 2]])
    for key in weighted.counts:
        torch.testing.assert_close(weighted.counts[key], repeated.counts[key])
    torch.testing.assert_close(weighted.log_likelihood, repeated.log_likelihood)


def test_tied_groups_accumulate_their_flows_together():
    emission = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=F64)
    first = pc.inputs(0, 2, pc.Categorical(2), params={"probs": emission})
    second = pc.inputs(1, 2, pc.Categorical(2), tie=first)
    root = pc.summate(pc.multiply(first, second), num_nodes=1, params=[[0.4, 0.6]])
    circuit = pc.compile(root, dtype=F64)
    x = torch.tensor([[0, 1], [1, 1], [0, 0]])
    counts = compute_flows(circuit, x).counts["cat_2x2"][0]
    posterior = torch.softmax(torch.log(torch.tensor([0.4, 0.6], dtype=F64))[None] + torch.log(emission[:, x[:, 0]].t())
                              + torch.log(emission[:, x[:, 1]].t()), dim=1)  # (B, 2) component posteriors
    expected = torch.zeros(2, 2, dtype=F64)
    for v in range(2):
        expected.index_add_(1, x[:, v], posterior.t())
    torch.testing.assert_close(counts, expected)


def test_gaussian_mixture_em_step_matches_the_closed_form():
    rng = np.random.default_rng(4)
    means, stds, weights = np.array([-1.0, 2.0]), np.array([0.5, 1.5]), np.array([0.3, 0.7])
    leaf = pc.inputs(0, 2, pc.Gaussian(), params={"mean": means, "std": stds})
    circuit = pc.compile(pc.summate(leaf, num_nodes=1, params=weights[None]), dtype=F64)
    x = rng.normal(size=50) * 2
    missing = np.zeros(50, dtype=bool)
    missing[:5] = True
    em = FullBatchEM(circuit)
    em.accumulate(torch.from_numpy(x)[:, None], missing=torch.from_numpy(missing)[:, None])
    em.step()
    dens = weights * np.exp(-0.5 * ((x[:, None] - means) / stds) ** 2) / (stds * math.sqrt(2 * math.pi))
    resp = dens / dens.sum(1, keepdims=True)
    resp[missing] = weights  # a missing value leaves the prior responsibilities
    first = np.where(missing[:, None], means, x[:, None])
    second = np.where(missing[:, None], means ** 2 + stds ** 2, x[:, None] ** 2)
    new_mean = (resp * first).sum(0) / resp.sum(0)
    new_std = np.sqrt((resp * second).sum(0) / resp.sum(0) - new_mean ** 2)
    params = circuit.params["gauss_2"][0].detach().numpy()
    np.testing.assert_allclose(params[0], new_mean, rtol=1e-10)
    np.testing.assert_allclose(np.exp(params[1]), new_std, rtol=1e-10)
    np.testing.assert_allclose(torch.exp(circuit.log_tables()["sum_1x2"])[0, 0].detach().numpy(), resp.mean(0), rtol=1e-10)


def test_bad_arguments_are_rejected_with_clear_errors():
    circuit = pc.compile(pc.structures.hmm(3, 2, 2, seed=0))
    x = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="weights: expected shape"):
        compute_flows(circuit, x, weights=torch.ones(3))
    with pytest.raises(ValueError, match="weights: expected finite, non-negative"):
        compute_flows(circuit, x, weights=torch.tensor([1.0, -1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="step_size"):
        MiniBatchEM(circuit, step_size=0.0)
    with pytest.raises(ValueError, match="pseudocount"):
        FullBatchEM(circuit, pseudocount=-1.0)
    with pytest.raises(RuntimeError, match="no data accumulated"):
        FullBatchEM(circuit).step()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        FullBatchEM(circuit, distributed=True)
    zero = pc.compile(pc.inputs(0, 1, pc.Categorical(2), params={"probs": [[1.0, 0.0]]}))
    with pytest.raises(pc.ZeroProbabilityError):
        compute_flows(zero, torch.tensor([[1]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("step_size", [1.0, 0.3])
def test_m_step_leaves_the_flows_untouched_and_normalises_every_row(dtype, step_size):
    """The M-step works in the circuit's dtype, in place where it can: the caller's flows
    (float64) must come out unchanged, and every updated row must sum to one."""
    circuit = pc.compile(pc.structures.hmm(4, 3, 5, homogeneous=False, seed=0), dtype=dtype)
    x = torch.randint(0, 5, (20, 4), generator=torch.Generator().manual_seed(0))
    flows = compute_flows(circuit, x)
    before = {key: value.clone() for key, value in flows.counts.items()}
    m_step(circuit, flows, step_size=step_size)
    for key, value in flows.counts.items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():  # the stored log-weights themselves are normalised
        for key, param in circuit.params.items():
            torch.testing.assert_close(param.exp().sum(-1), torch.ones(param.shape[:-1], dtype=dtype), msg=key)
