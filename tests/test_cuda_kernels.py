"""Every CUDA kernel, run unchanged in the CPU emulator in three thread orders (with fused
multiply-adds, as nvcc compiles them), agrees with the torch path to a few ulps on random
inputs (values far apart, ``-inf`` entries, shared and per-group weights, float32 and
float64), including gradients and sampling choices.

Tolerances are in ulps (:mod:`cuda_emulation.ulp`): log-values within :data:`LOG_ULPS` of
``max(|y|, 1)``; flows normwise, within ``FLOW_ULPS_PER_UNIT`` per unit of the largest
exponent argument ``|x + logw - y|`` (an input rounded to its ulp moves ``exp(arg)`` by
``|arg|`` ulps, for the kernel and torch alike)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from cuda_emulation.runner import EmulatorRunner
from cuda_emulation.ulp import assert_ulp_close
from pclayer.cuda import ops
from pclayer.ops import dispatch
from pclayer.ops.inverse_cdf import inverse_cdf
from pclayer.ops.log_matmul_exp import log_matmul_exp
from pclayer.ops.masked_logsumexp import masked_logsumexp
from pclayer.ops.sparse_evidence import categorical_topk_evidence

ORDERS = ("index", "reversed", "shuffled")
DTYPES = st.sampled_from([torch.float32, torch.float64])


@functools.cache
def runner(order: str) -> EmulatorRunner:
    return EmulatorRunner(thread_order=order, seed=11)


LOG_ULPS = 16
"""Measured worst case over these tests: 12 ulps (float32 and float64, torch's own error included)."""
FLOW_ULPS_PER_UNIT = 2
"""Measured worst case: 0.35 ulps per unit of the largest exponent argument (normwise, float64)."""


def _flow_ulps(*log_values: torch.Tensor) -> float:
    """Normwise flow tolerance: :data:`FLOW_ULPS_PER_UNIT` times (16 + the largest finite
    magnitude among the log-values that enter the exponent)."""
    largest = max((float(v[torch.isfinite(v)].abs().max()) for v in log_values if bool(torch.isfinite(v).any())),
                  default=0.0)
    return FLOW_ULPS_PER_UNIT * (16 + 2 * largest)


def _log_values(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, scale: float, neg_inf: float) -> torch.Tensor:
    """Random log-values: normal * scale, with a fraction ``neg_inf`` of ``-inf``."""
    values = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    values[torch.rand(shape, generator=g, dtype=torch.float64) < neg_inf] = -torch.inf
    return values.to(dtype)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    assert_ulp_close(actual, expected, dtype, LOG_ULPS)


dense_cases = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "groups": st.integers(1, 3), "nodes": st.integers(1, 140),
    "children": st.integers(1, 150), "shared": st.booleans(), "dtype": DTYPES,
    "scale": st.sampled_from([1.0, 30.0, 300.0]), "neg_inf": st.sampled_from([0.0, 0.3, 0.97]),
    "seed": st.integers(0, 2**31),
})


@given(dense_cases)
@example({"batch": 2, "groups": 3, "nodes": 140, "children": 150, "shared": False, "dtype": torch.float32,
          "scale": 30.0, "neg_inf": 0.3, "seed": 1})  # several x tiles and two node blocks per row
@example({"batch": 2, "groups": 2, "nodes": 129, "children": 257, "shared": True, "dtype": torch.float64,
          "scale": 300.0, "neg_inf": 0.0, "seed": 2})
def test_sum_dense_forward_and_flows_equal_log_matmul_exp(case):
    g = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    x = _log_values(g, (case["batch"], case["groups"], case["children"]), dtype, case["scale"], case["neg_inf"])
    # normalised log-weights are <= 0 (the torch path overflows exp(logw) for large positive ones)
    logw = -_log_values(g, (1 if case["shared"] else case["groups"], case["nodes"], case["children"]), dtype,
                        case["scale"], case["neg_inf"]).abs()
    grad_y = torch.randn(case["batch"], case["groups"], case["nodes"], generator=g, dtype=dtype)
    xt, wt = x.clone().requires_grad_(), logw.clone().requires_grad_()
    expected = log_matmul_exp(xt, wt)
    expected.backward(grad_y)
    for order in ORDERS:
        xk, wk = x.clone().requires_grad_(), logw.clone().requires_grad_()
        y = ops.sum_dense(runner(order), xk, wk)
        _assert_close(y.detach(), expected.detach(), dtype)
        y.backward(grad_y)
        flow_ulps = _flow_ulps(x, logw, expected.detach())
        assert_ulp_close(xk.grad, xt.grad, dtype, flow_ulps, normwise=True)
        assert_ulp_close(wk.grad, wt.grad, dtype, flow_ulps, normwise=True)


@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 9), DTYPES, st.sampled_from([0.0, 0.5, 1.0]),
       st.integers(0, 2**31))
def test_padded_sum_forward_and_backward_equal_masked_logsumexp(rows, cols, width, dtype, neg_inf, seed):
    g = torch.Generator().manual_seed(seed)
    a = _log_values(g, (rows, cols, width), dtype, 20.0, neg_inf)
    grad_y = torch.randn(rows, cols, generator=g, dtype=dtype)
    at = a.clone().requires_grad_()
    expected = masked_logsumexp(at)
    expected.backward(grad_y)
    for order in ORDERS:
        ak = a.clone().requires_grad_()
        y = ops.logsumexp(runner(order), ak)
        _assert_close(y.detach(), expected.detach(), dtype)
        y.backward(grad_y)
        assert_ulp_close(ak.grad, at.grad, dtype, _flow_ulps(a, expected.detach()), normwise=True)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(1, 8), st.booleans(),
       DTYPES, st.integers(0, 2**31))
def test_categorical_topk_evidence_equals_torch_path(batch, groups, k, nodes, cats, shared, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    values = _log_values(g, (batch, groups, k), dtype, 3.0, 0.2)
    indices = torch.randint(0, cats, (batch, groups, k), generator=g)
    table = torch.log_softmax(_log_values(g, (1 if shared else groups, nodes, cats), dtype, 2.0, 0.0), -1)
    expected = categorical_topk_evidence(values, indices, table)
    for order in ORDERS:
        _assert_close(ops.categorical_topk_forward(runner(order), values, indices, table), expected, dtype)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 40), st.booleans(), DTYPES,
       st.integers(0, 2**31))
def test_categorical_full_soft_evidence_runs_the_dense_kernel(batch, groups, nodes, cats, shared, dtype, seed):
    """log sum_k theta_n(k) w(k) with dense evidence w: the dense sum kernel with x = log w."""
    g = torch.Generator().manual_seed(seed)
    evidence = _log_values(g, (batch, groups, cats), dtype, 3.0, 0.3)
    table = torch.log_softmax(_log_values(g, (1 if shared else groups, nodes, cats), dtype, 2.0, 0.0), -1)
    brute = torch.logsumexp(evidence.double()[:, :, None, :] + table.double().expand(groups, -1, -1)[None], -1)
    for order in ORDERS:
        _assert_close(ops.sum_dense_forward(runner(order), evidence, table), brute.to(dtype), dtype)


@given(st.integers(1, 300), st.integers(1, 12), DTYPES, st.sampled_from([0.0, 0.4, 0.9, 1.0]),
       st.sampled_from([1.0, 50.0]), st.integers(0, 2**31))
def test_inverse_cdf_chooses_identically_for_identical_uniforms(rows, cols, dtype, neg_inf, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = _log_values(g, (rows, cols), dtype, scale, neg_inf)
    uniforms = torch.rand(rows, generator=g, dtype=dtype)
    uniforms[: rows // 10] = torch.tensor([0.0, 1.0], dtype=dtype).repeat(rows)[: rows // 10]
    expected = inverse_cdf(logits, uniforms)
    for order in ORDERS:
        assert torch.equal(ops.inverse_cdf(runner(order), logits, uniforms), expected)


@given(st.integers(1, 40), st.integers(0, 300), st.integers(1, 12), DTYPES, st.sampled_from([0.0, 0.4, 1.0]),
       st.integers(0, 2**31))
def test_inverse_cdf_over_table_rows_chooses_as_over_the_gathered_rows(table_rows, draws, cols, dtype, neg_inf, seed):
    """Many draws from a few distributions (a table and a row per draw) choose exactly what
    the same draws from the gathered rows choose, on the torch path and the dispatched one."""
    g = torch.Generator().manual_seed(seed)
    table = _log_values(g, (table_rows, cols), dtype, 50.0, neg_inf)
    rows = torch.randint(0, table_rows, (draws,), generator=g)
    uniforms = torch.rand(draws, generator=g, dtype=dtype)
    uniforms[: draws // 10] = torch.tensor([0.0, 1.0], dtype=dtype).repeat(draws)[: draws // 10]
    expected = inverse_cdf(table.index_select(0, rows), uniforms)
    assert torch.equal(inverse_cdf(table, uniforms, rows), expected)
    assert torch.equal(dispatch.inverse_cdf(table, uniforms, rows=rows), expected)


def test_empty_inputs_launch_nothing():
    r = EmulatorRunner()
    assert ops.sum_dense_forward(r, torch.zeros(0, 2, 3), torch.zeros(2, 4, 3)).shape == (0, 2, 4)
    assert ops.logsumexp_forward(r, torch.zeros(0, 3)).shape == (0,)
    assert ops.inverse_cdf(r, torch.zeros(0, 3), torch.zeros(0)).shape == (0,)
    assert r.launched == []
    # zero children: every sum is empty, so -inf
    y = ops.sum_dense_forward(r, torch.zeros(2, 1, 0), torch.zeros(1, 3, 0))
    assert y.shape == (2, 1, 3) and bool(torch.isneginf(y).all())


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="float32 and float64, got torch.float16"):
        ops.logsumexp_forward(EmulatorRunner(), torch.zeros(2, 3, dtype=torch.float16))
