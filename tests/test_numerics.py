"""Numerical robustness: long chains in fp32, fp32/fp64 agreement, batch invariance,
zero-probability evidence, and the exact-row fallback of ``log_matmul_exp``."""

from __future__ import annotations


import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pclayer.testing import hmm as hmm_ref
from pclayer.testing.strategies import circuits, evidence
from pclayer.ops import log_matmul_exp

# The module (shadowed by the function of the same name in pclayer.ops) and its floor table.
from pclayer.numerics import SAFE_FLOOR as _SAFE_SUM_FLOOR


def test_long_wide_hmm_in_fp32_does_not_underflow():
    rng = np.random.default_rng(0)
    states, cats, length = 512, 4, 1024
    init, trans, emit = hmm_ref.random_params(rng, states, cats)
    root = pc.structures.hmm(length, states, cats, initial=init, transition=trans, emission=emit)
    circuit = pc.compile(root, dtype=torch.float32)
    x = rng.integers(0, cats, size=(2, length))
    with torch.no_grad():
        result = circuit.log_prob(torch.as_tensor(x)).numpy().astype(np.float64)
    expected = np.array([hmm_ref.forward_scaled(init, trans, emit, row) for row in x])
    assert np.all(expected < -1000)  # far below the fp32 floor exp(-103) in probability space
    assert np.all(np.isfinite(result))
    np.testing.assert_allclose(result, expected, rtol=1e-5)


@given(circuits(), st.data())
def test_fp32_agrees_with_fp64(root, data):
    x, missing, weights = data.draw(evidence(root, batch=5))
    circuit64 = pc.compile(root, dtype=torch.float64)
    circuit32 = pc.compile(root, dtype=torch.float32)
    args = (torch.as_tensor(x), torch.as_tensor(missing), None if weights is None else torch.as_tensor(weights))
    lp64 = circuit64.log_prob(*args).detach().numpy()
    lp32 = circuit32.log_prob(*args).detach().numpy().astype(np.float64)
    np.testing.assert_array_equal(np.isfinite(lp32), np.isfinite(lp64))
    finite = np.isfinite(lp64)
    np.testing.assert_allclose(lp32[finite], lp64[finite], rtol=1e-5, atol=1e-5)
    if finite.any():
        keep = torch.as_tensor(finite)
        rows = (args[0][keep], args[1][keep], None if args[2] is None else args[2][keep])
        np.testing.assert_allclose(circuit32.posterior(*rows).numpy(), circuit64.posterior(*rows).numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_results_do_not_depend_on_batch_composition(dtype):
    rng = np.random.default_rng(3)
    init, trans, emit = hmm_ref.random_params(rng, 16, 5)
    circuit = pc.compile(pc.structures.hmm(40, 16, 5, initial=init, transition=trans, emission=emit), dtype=dtype)
    x = torch.as_tensor(rng.integers(0, 5, size=(33, 40)))
    missing = torch.as_tensor(rng.random((33, 40)) < 0.3)
    soft = torch.as_tensor(rng.normal(size=(33, 40, 5)), dtype=dtype)
    with torch.no_grad():
        full = circuit.log_prob(x, missing, soft)
        single = torch.cat([circuit.log_prob(x[b:b + 1], missing[b:b + 1], soft[b:b + 1]) for b in range(33)])
        order = torch.as_tensor(rng.permutation(33))
        permuted = circuit.log_prob(x[order], missing[order], soft[order])
        doubled = circuit.log_prob(torch.cat([x, x]), torch.cat([missing, missing]), torch.cat([soft, soft]))
    tolerance = {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(single, full, **tolerance)
    torch.testing.assert_close(permuted, full[order], **tolerance)
    torch.testing.assert_close(doubled, torch.cat([full, full]), **tolerance)
    post_full = circuit.posterior(x, missing, soft)
    post_half = circuit.posterior(x[:7], missing[:7], soft[:7])
    torch.testing.assert_close(post_half, post_full[:7], **tolerance)


# ---------------------------------------------------------------------------------------
# Evidence of probability zero
# ---------------------------------------------------------------------------------------


def _hmm_without_category_two() -> tuple[pc.TensorCircuit, tuple]:
    rng = np.random.default_rng(5)
    init, trans, emit = hmm_ref.random_params(rng, 3, 3)
    emit[:, 2] = 0.0
    emit = emit / emit.sum(-1, keepdims=True)
    root = pc.structures.hmm(4, 3, 3, initial=init, transition=trans, emission=emit)
    return pc.compile(root, dtype=torch.float64), (init, trans, emit)


def test_impossible_evidence_gives_minus_infinity_and_query_errors():
    circuit, params = _hmm_without_category_two()
    x = torch.tensor([[0, 2, 1, 0], [0, 1, 1, 0]])
    lp = circuit.log_prob(x)
    assert lp[0].item() == -np.inf
    assert lp[1].item() == pytest.approx(hmm_ref.forward(*params, x[1].numpy()), rel=1e-12)
    missing = torch.tensor([[True, False, False, False], [True, False, False, False]])
    with pytest.raises(pc.ZeroProbabilityError, match=r"posterior: the evidence of rows \[0\] has probability zero"):
        circuit.posterior(x, missing)
    with pytest.raises(pc.ZeroProbabilityError, match=r"mpe: the evidence of rows \[0\] has probability zero"):
        circuit.mpe(x, missing)
    with pytest.raises(pc.ZeroProbabilityError, match=r"sample: the evidence of rows \[0\] has probability zero"):
        circuit.sample(x=x, missing=missing, generator=torch.Generator().manual_seed(0))


def test_soft_evidence_that_excludes_every_value_has_probability_zero():
    circuit, _ = _hmm_without_category_two()
    x = torch.zeros(2, 4, dtype=torch.long)
    missing = torch.tensor([[False, True, False, False]] * 2)
    soft = torch.zeros(2, 4, 3, dtype=torch.float64)
    soft[0, 1, :2] = -torch.inf  # only category 2 allowed, which is impossible
    soft[1, 1, 0] = -torch.inf
    lp = circuit.log_prob(x, missing, soft)
    assert lp[0].item() == -np.inf and np.isfinite(lp[1].item())
    with pytest.raises(pc.ZeroProbabilityError, match=r"rows \[0\]"):
        circuit.sample(x=x, missing=missing, soft_evidence=soft)
    with pytest.raises(pc.ZeroProbabilityError, match=r"rows \[0\]"):
        circuit.mpe(x, missing, soft)
    with pytest.raises(pc.ZeroProbabilityError, match=r"rows \[0\]"):
        circuit.posterior(x, missing, soft)
    # Row 1 alone is fine and only ever decodes a possible, allowed value.
    assert circuit.mpe(x[1:], missing[1:], soft[1:])[0, 1].item() == 1


def test_gradients_stay_finite_next_to_impossible_rows():
    circuit, _ = _hmm_without_category_two()
    x = torch.tensor([[0, 2, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]])
    lp = circuit.log_prob(x)
    lp[torch.isfinite(lp)].sum().backward()
    for name, param in circuit.params.items():
        assert torch.isfinite(param.grad).all(), name


# ---------------------------------------------------------------------------------------
# Identity transitions: the exact-row fallback of log_matmul_exp
# ---------------------------------------------------------------------------------------

EPS = 1e-20


def _identity_hmm(length: int, dtype: torch.dtype, init: np.ndarray) -> tuple[pc.TensorCircuit, tuple]:
    states = 3
    trans = np.eye(states)
    emit = np.full((states, states), EPS) + np.eye(states) * (1 - states * EPS)
    root = pc.structures.hmm(length, states, states, initial=init, transition=trans, emission=emit)
    return pc.compile(root, dtype=dtype), (init, trans, emit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_hmm_with_evidence_forcing_a_low_probability_path_is_exact(dtype):
    length = 40
    # All mass starts in state 0, the evidence only fits state 1: the one possible path has
    # probability EPS**40 = 1e-800, below even the float64 range in probability space.
    circuit, params = _identity_hmm(length, dtype, np.array([1.0, 0.0, 0.0]))
    rng = np.random.default_rng(11)
    x = np.ones((4, length), dtype=np.int64)
    x[2] = rng.integers(0, 3, size=length)
    x[3, ::2] = 0
    missing = np.zeros_like(x, dtype=bool)
    missing[1, 5:9] = True
    missing[3] = rng.random(length) < 0.4
    soft = rng.normal(size=(4, length, 3))
    xt, mt, st_ = torch.as_tensor(x), torch.as_tensor(missing), torch.as_tensor(soft, dtype=dtype)
    with torch.no_grad():
        result = circuit.log_prob(xt, mt, st_).numpy().astype(np.float64)
    expected = np.array([hmm_ref.forward(*params, x[b], missing[b], soft[b]) for b in range(4)])
    assert np.all(expected[:3] < -700)
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(result, expected, rtol=rtol)
    post = circuit.posterior(xt, mt, st_).numpy()
    expected_post = np.stack([hmm_ref.posterior(*params, x[b], missing[b], soft[b]) for b in range(4)])
    np.testing.assert_allclose(post, expected_post, atol=1e-5 if dtype == torch.float32 else 1e-10)
    circuit.log_prob(xt, mt, st_).sum().backward()
    for name, param in circuit.params.items():
        assert not torch.isnan(param.grad).any(), name
    decoded = circuit.mpe(xt, mt, st_).numpy()
    for b in range(4):
        best, _, viterbi_x = hmm_ref.viterbi(*params, x[b], missing[b], soft[b])
        assert hmm_ref.joint_log_score(*params, decoded[b], soft[b]) == pytest.approx(best, rel=rtol)


def test_identity_hmm_needs_the_exact_row_fallback(monkeypatch):
    """Without the per-node recomputation the same query underflows to -inf in fp32:
    proof that the test above exercises the fallback."""
    circuit, params = _identity_hmm(40, torch.float32, np.array([1.0, 0.0, 0.0]))
    x = torch.ones(1, 40, dtype=torch.long)
    expected = hmm_ref.forward(*params, x[0].numpy())
    assert circuit.log_prob(x).item() == pytest.approx(expected, rel=1e-6)
    monkeypatch.setitem(_SAFE_SUM_FLOOR, torch.float32, 0.0)
    assert circuit.log_prob(x).item() == -np.inf


@pytest.mark.parametrize("weight_groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_matmul_exp_matches_float64_logsumexp_and_its_gradients(dtype, weight_groups):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, generator=generator, dtype=torch.float64) * 30
    x[0, 0, :3] -= 800  # node 0 reads only children far below the row maximum (underflows even in fp64)
    x[1, 1] = -torch.inf  # a row of impossible children
    logw = torch.log_softmax(torch.randn(weight_groups, 4, 7, generator=generator, dtype=torch.float64), -1)
    logw[:, 0, 3:] = -torch.inf  # node 0 only reads children 0..2
    expected = torch.logsumexp(x[:, :, None, :] + logw[None], -1)
    xd, wd = x.clone().to(dtype).requires_grad_(True), logw.clone().to(dtype).requires_grad_(True)
    y = log_matmul_exp(xd, wd)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(y), finite)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y[finite].double(), expected[finite], rtol=rtol, atol=rtol)
    grad_out = torch.rand(y.shape, generator=generator, dtype=torch.float64)
    y.backward(torch.where(finite, grad_out, 0).to(dtype))
    # Edge flows: d y[b,g,n] / d logw[g,n,c] = exp(x[b,g,c] + logw[g,n,c] - y[b,g,n]) on finite rows.
    safe_y = torch.where(finite, expected, 0.0)
    flow = torch.where(finite[..., None], grad_out[..., None] * torch.exp(x[:, :, None, :] + logw[None] - safe_y[..., None]), 0.0)
    torch.testing.assert_close(xd.grad.double(), flow.sum(2), rtol=rtol, atol=rtol)
    expected_grad_w = flow.sum(0) if weight_groups > 1 else flow.sum((0, 1))[None]
    torch.testing.assert_close(wd.grad.double(), expected_grad_w, rtol=rtol, atol=rtol)
