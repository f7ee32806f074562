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

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from cuda_emulation.runner import EmulatorRunner, mutated_emulator
from cuda_emulation.ulp import assert_ulp_close
from pclayer.cuda import ops
from pclayer.ops import dispatch
from pclayer.ops.inverse_cdf import inverse_cdf
from pclayer.ops.log_matmul_exp import log_matmul_exp
from pclayer.ops.masked_logsumexp import masked_logsumexp
from pclayer.ops.max_plus import max_plus
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


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.sampled_from([1, 5, 40, 150]), st.integers(1, 8),
       st.booleans(), DTYPES, st.integers(0, 2**31))
@example(2, 3, 6, 150, 2, False, torch.float32, 0)  # repeated categories (atomics), two node blocks
def test_categorical_topk_evidence_and_flows_equal_torch_path(batch, groups, k, nodes, cats, shared, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    values = _log_values(g, (batch, groups, k), dtype, 3.0, 0.2)
    indices = torch.randint(0, cats, (batch, groups, k), generator=g)
    table = torch.log_softmax(_log_values(g, (1 if shared else groups, nodes, cats), dtype, 2.0, 0.0), -1)
    grad_y = torch.randn(batch, groups, nodes, generator=g, dtype=dtype)
    vt, tt = values.clone().requires_grad_(), table.clone().requires_grad_()
    expected = categorical_topk_evidence(vt, indices, tt)
    expected.backward(grad_y)
    flow_ulps = _flow_ulps(values, table, expected.detach())
    for order in ORDERS:
        vk, tk = values.clone().requires_grad_(), table.clone().requires_grad_()
        y = ops.categorical_topk(runner(order), vk, indices, tk)
        _assert_close(y.detach(), expected.detach(), dtype)
        y.backward(grad_y)
        assert_ulp_close(vk.grad, vt.grad, dtype, flow_ulps, normwise=True)
        assert_ulp_close(tk.grad, tt.grad, dtype, flow_ulps, normwise=True)


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


CDF_BOUNDARY_ULPS = 4
"""How close (in ulps of the dtype at the total) ``u * total`` must lie to a CDF boundary for
kernel and torch to be allowed different draws: the kernel's parallel prefix sums in double,
rounded to the dtype, differ from torch's sequential ones by at most one rounding."""


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """(A, C) float64 of the unnormalised probabilities the dtype's ``exp`` gives, as both
    paths use them (their cumulative sum in float64 is the exact CDF to within one rounding)."""
    m = logits.amax(-1, keepdim=True)
    return torch.exp(logits - torch.where(torch.isfinite(m), m, torch.zeros_like(m))).double()


def assert_same_draws_but_at_boundaries(chosen: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor,
                                        uniforms: torch.Tensor) -> int:
    """Draws agree, except where ``u * total`` lies within :data:`CDF_BOUNDARY_ULPS` of every
    CDF value between the two choices; a kernel draw never has zero probability unless its row
    has none. Returns the number of boundary draws."""
    probs = _probs(logits)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    target = (uniforms * total.to(logits.dtype)).double()
    differ = (chosen != expected).nonzero().squeeze(1)
    tolerance = CDF_BOUNDARY_ULPS * torch.finfo(logits.dtype).eps * total
    for a in differ.tolist():
        low, high = sorted((int(chosen[a]), int(expected[a])))
        gap = (cdf[a, low:high] - target[a]).abs().max()
        assert gap <= tolerance[a], f"draw {a}: kernel {int(chosen[a])}, torch {int(expected[a])}, " \
                                    f"target {float(target[a])} is {float(gap)} from a boundary"
    picked = probs.gather(1, chosen[:, None]).squeeze(1)
    assert bool(((picked > 0) | (total == 0)).all()), "a draw of zero probability"
    return len(differ)


def _uniforms_with_edges(g: torch.Generator, logits: torch.Tensor) -> torch.Tensor:
    """Random uniforms; a tenth 0 or 1, a tenth landing exactly on a CDF value (a boundary)."""
    draws = logits.shape[0]
    uniforms = torch.rand(draws, generator=g, dtype=logits.dtype)
    uniforms[: draws // 10] = torch.tensor([0.0, 1.0], dtype=logits.dtype).repeat(draws)[: draws // 10]
    cdf = _probs(logits).cumsum(-1)
    on_boundary = torch.arange(draws // 10, 2 * (draws // 10))
    column = torch.randint(0, logits.shape[1], (len(on_boundary),), generator=g)
    exact = cdf[on_boundary, column] / cdf[on_boundary, -1]
    uniforms[on_boundary] = torch.where(torch.isfinite(exact), exact, torch.zeros_like(exact)).to(logits.dtype)
    return uniforms


@given(st.integers(1, 300), st.sampled_from([1, 7, 33, 200, 4096, 4097]), DTYPES,
       st.sampled_from([0.0, 0.4, 0.9, 1.0]), st.sampled_from([1.0, 50.0]), st.integers(0, 2**31))
@example(9, 4096, torch.float32, 0.4, 1.0, 0)  # the widest warp row
@example(2, 4097, torch.float64, 0.0, 1.0, 1)  # the narrowest block row
@example(1, 9000, torch.float32, 0.4, 50.0, 2)  # three block tiles, the last partial
def test_inverse_cdf_draws_as_torch_but_at_cdf_boundaries(rows, cols, dtype, neg_inf, scale, seed):
    g = torch.Generator().manual_seed(seed)
    rows = rows if cols <= 200 else min(rows, 3 if cols <= ops.CDF_WARP_MAX_C else 1)
    logits = _log_values(g, (rows, cols), dtype, scale, neg_inf)
    uniforms = _uniforms_with_edges(g, logits)
    expected = inverse_cdf(logits, uniforms)
    for order in ORDERS:
        assert_same_draws_but_at_boundaries(ops.inverse_cdf(runner(order), logits, uniforms), expected, logits, uniforms)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 120), st.sampled_from([3, 12, 200]), DTYPES,
       st.integers(0, 2**31))
@example(3, 2, 2, 5000, torch.float32, 0)  # the block kernel
def test_inverse_cdf_fuses_the_gather_of_weights_plus_values(weight_rows, value_rows, draws, cols, dtype, seed):
    """Draw a from logw[rows[a]] + x[x_rows[a]] in one kernel: as torch on the gathered sum."""
    g = torch.Generator().manual_seed(seed)
    draws = draws if cols < 5000 else min(draws, 2)
    logw = -_log_values(g, (weight_rows, cols), dtype, 3.0, 0.3).abs()
    x = _log_values(g, (value_rows, cols), dtype, 20.0, 0.2)
    rows = torch.randint(0, weight_rows, (draws,), generator=g)
    x_rows = torch.randint(0, value_rows, (draws,), generator=g)
    logits = logw.index_select(0, rows) + x.index_select(0, x_rows)
    uniforms = torch.rand(draws, generator=g, dtype=dtype)
    expected = inverse_cdf(logits, uniforms)
    assert torch.equal(dispatch.inverse_cdf(logw, uniforms, rows=rows, addend=x, addend_rows=x_rows), expected)
    for order in ORDERS:
        chosen = ops.inverse_cdf(runner(order), logw, uniforms, rows, x, x_rows)
        assert_same_draws_but_at_boundaries(chosen, expected, logits, uniforms)


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
    assert_same_draws_but_at_boundaries(ops.inverse_cdf(runner("shuffled"), table, uniforms, rows), expected,
                                        table.index_select(0, rows), uniforms)


@given(st.integers(1, 70), st.integers(1, 3), st.integers(1, 70), st.integers(1, 70), st.booleans(), DTYPES,
       st.sampled_from([0.0, 0.3, 1.0]), st.integers(0, 2**31))
@example(65, 2, 33, 70, False, torch.float32, 0.3, 0)  # partial tiles along rows, nodes and children
def test_max_plus_kernel_equals_the_chunked_torch_path_exactly(batch, groups, nodes, children, shared, dtype, neg_inf,
                                                                 seed):
    """Sums and maxima round identically on both paths, so the results are bit-equal."""
    g = torch.Generator().manual_seed(seed)
    x = _log_values(g, (batch, groups, children), dtype, 30.0, neg_inf)
    logw = _log_values(g, (1 if shared else groups, nodes, children), dtype, 30.0, neg_inf)
    expected = max_plus(x, logw)
    for order in ORDERS:
        assert torch.equal(ops.max_plus_forward(runner(order), x, logw), expected)


def test_max_plus_without_its_second_barrier_is_caught(tmp_path):
    """Mutation check: without the barrier after the tile is read, the next tile's loads
    overwrite it under threads still reading; some thread order must give wrong maxima."""
    g = torch.Generator().manual_seed(0)
    x, logw = torch.randn(40, 1, 100, generator=g), torch.randn(1, 40, 100, generator=g)
    expected = max_plus(x, logw)
    wrong = 0
    for order in ORDERS:
        emulator = mutated_emulator(tmp_path, "max_plus.cu", "    __syncthreads();\n  }\n  for (int i", "  }\n  for (int i", order)
        y = torch.empty(40, 1, 40)
        emulator.get_function("pc_max_plus_fwd_f32")((2, 2, 1), (16, 16, 1), (x.numpy(), logw.numpy(), y.numpy(), np.int32(40),
                                                                           np.int32(1), np.int32(40), np.int32(100), np.int32(1)))
        wrong += int((y != expected).sum())
    assert wrong > 0


VOCABULARY = 126_464
"""LLaDA's vocabulary: the rows CoDD samples tokens from."""


def test_vocabulary_size_rows_draw_the_exact_inverse_cdf():
    """Rows of 126,464 categories (the block-per-row kernel): each draw is the exact inverse
    CDF of the float64 distribution up to :data:`CDF_BOUNDARY_ULPS` float32 ulps of the total,
    and equals torch's draw but at CDF boundaries; one draw per thread order."""
    g = torch.Generator().manual_seed(0)
    logits64 = torch.randn(1, VOCABULARY, generator=g, dtype=torch.float64) * 3
    logits64[torch.rand(logits64.shape, generator=g) < 0.1] = -torch.inf
    logits = logits64.float()
    probs = torch.exp(logits64 - logits64.max())
    cdf = torch.cat([probs.new_zeros(1, 1), probs.cumsum(-1)], dim=1)  # cdf[:, c] = mass before c
    tolerance = CDF_BOUNDARY_ULPS * torch.finfo(torch.float32).eps * float(cdf[0, -1])
    rows = torch.zeros(1, dtype=torch.int64)
    for order, u in zip(ORDERS, (0.3141, 0.9999, 0.5)):
        uniforms = torch.tensor([u])
        chosen = ops.inverse_cdf(runner(order), logits, uniforms, rows)
        assert runner(order).launched[-1] == "pc_inverse_cdf_block_f32"
        assert_same_draws_but_at_boundaries(chosen, inverse_cdf(logits, uniforms), logits, uniforms)
        target, c = u * float(cdf[0, -1]), int(chosen[0])
        assert float(cdf[0, c]) - tolerance <= target < float(cdf[0, c + 1]) + tolerance, order


def test_vocabulary_size_tables_under_soft_evidence():
    """Categorical inputs over 126,464 categories in float32 against float64: top-k evidence
    (k = 64) and its flows within a few ulps; full soft evidence on the dense kernel within
    2,048 ulps, a sequential float32 sum over the vocabulary whose error grows with its length
    (measured 472 ulps; torch's float32 route 95). The reference sees the same float32 inputs."""
    g = torch.Generator().manual_seed(0)
    table = torch.log_softmax(torch.randn(1, 8, VOCABULARY, generator=g) * 2, -1)
    evidence = torch.randn(2, 1, VOCABULARY, generator=g) * 3
    dense = ops.sum_dense_forward(runner("shuffled"), evidence, table)
    assert_ulp_close(dense, log_matmul_exp(evidence.double(), table.double()), torch.float32, 2048)
    values, indices = torch.topk(evidence, 64, -1)
    vk, tk = values.clone().requires_grad_(), table.clone().requires_grad_()
    y = ops.categorical_topk(runner("shuffled"), vk, indices, tk)
    y.backward(torch.ones_like(y))
    vr, tr = values.double().requires_grad_(), table.double().requires_grad_()
    expected = categorical_topk_evidence(vr, indices, tr)
    expected.backward(torch.ones_like(expected))
    assert_ulp_close(y.detach(), expected.detach(), torch.float32, 4)  # measured 1.2
    assert_ulp_close(vk.grad, vr.grad, torch.float32, 8, normwise=True)  # measured 1.3
    assert_ulp_close(tk.grad, tr.grad, torch.float32, 8, normwise=True)  # measured 2.6


def test_block_scan_without_its_second_barrier_is_caught(tmp_path):
    """Mutation check on the sampling kernel: without the barrier after the warps read the
    shared warp totals, a warp running ahead overwrites them (next tile) before another has
    read them; the emulated draws must go wrong in some thread order."""
    read = "const double warp_inclusive = warp_inclusive_scan(lane() < warps() ? scratch[lane()] : 0.0, lane());\n"
    g = torch.Generator().manual_seed(0)
    logits, uniforms = torch.randn(4, 9000, generator=g), torch.rand(4, generator=g)
    expected = inverse_cdf(logits, uniforms)
    wrong = 0
    for order in ORDERS:
        out = torch.zeros(4, dtype=torch.int64)
        emulator = mutated_emulator(tmp_path, "inverse_cdf.cu", read + "    __syncthreads();", read, order, seed=2)
        kernel = emulator.get_function("pc_inverse_cdf_block_f32")
        kernel((4, 1, 1), (1024, 1, 1), (logits.numpy(), torch.arange(4).numpy(), logits.numpy(), torch.arange(4).numpy(),
                                         np.int32(0), uniforms.numpy(), out.numpy(), np.int64(4), np.int32(9000)))
        wrong += int((out != expected).sum())
    assert wrong > 0


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
