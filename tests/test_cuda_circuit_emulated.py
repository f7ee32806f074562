"""Whole circuits run through the dispatch point on the (emulated) CUDA kernels give the same
likelihoods, parameter flows, posteriors and samples as the torch path."""

from __future__ import annotations

import contextlib

import numpy as np
import pclayer as pc
import pytest
import torch
from pclayer.testing.strategies import circuits, evidence
from hypothesis import given
from hypothesis import strategies as st

from cuda_emulation.runner import EmulatorRunner
from pclayer.ops import dispatch
from pclayer.queries.evidence import prepare
from pclayer.representations import LOG_SUM

_EMULATOR = EmulatorRunner(thread_order="shuffled", seed=5)


def _log_sum_log_prob(circuit, x, missing=None, soft=None):
    """log_prob through the log-sum representation of the traversal: the representation the
    log-space kernels implement (the scaled one runs dense sums as torch matrix products)."""
    ev = prepare(circuit, x, missing, soft)
    return circuit.evaluate(LOG_SUM, ev.x, ev.missing, ev.soft_evidence).root(circuit)


@contextlib.contextmanager
def _kernels_for_cpu_tensors(circuit=None):
    """Route dispatched operations on CPU tensors to the emulated kernels (as if on a GPU):
    ``circuit`` runs with ``backend="cuda"`` inside, ``"torch"`` after."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "_kernel_obstacle", lambda tensors, differentiable: None)
        patch.setattr(dispatch, "_runner", lambda: _EMULATOR)
        _EMULATOR.launched.clear()
        if circuit is not None:
            circuit.runtime.backend = "cuda"
        try:
            yield _EMULATOR
        finally:
            if circuit is not None:
                circuit.runtime.backend = "torch"


def _queries(circuit, x, missing, soft, seed):
    circuit.zero_grad()
    log_p = _log_sum_log_prob(circuit, x, missing, soft)
    torch.testing.assert_close(log_p, circuit.log_prob(x, missing=missing, soft_evidence=soft), rtol=1e-10, atol=1e-10)
    if log_p.requires_grad:  # a lone Indicator leaf has no parameters
        log_p.sum().backward()
    flows = {k: v.grad.clone() for k, v in circuit.params.items() if v.grad is not None}
    keep = torch.isfinite(log_p.detach())  # conditionals exist only for evidence of positive probability
    x, missing = x[keep], missing[keep]
    soft = None if soft is None else soft[keep]
    post = circuit.posterior(x, missing=missing, soft_evidence=soft)
    samples = circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(seed),
                             return_nodes=True)
    return log_p.detach(), flows, post, samples


@given(circuits(max_vars=4), st.data())
def test_random_circuits_on_kernels_equal_torch_path(root, data):
    circuit = pc.compile(root, dtype=torch.float64)
    x, missing, weights = data.draw(evidence(circuit, batch=4))
    soft = None if weights is None else torch.tensor(weights)
    with _kernels_for_cpu_tensors(circuit):
        kernel = _queries(circuit, torch.tensor(x), torch.tensor(missing), soft, seed=3)
        assert circuit.runtime.last_backend != "torch"  # None where nothing was dispatched
    circuit.runtime.last_backend = None
    reference = _queries(circuit, torch.tensor(x), torch.tensor(missing), soft, seed=3)
    assert circuit.runtime.last_backend != "cuda"
    torch.testing.assert_close(kernel[0], reference[0], rtol=1e-10, atol=1e-10)
    assert kernel[1].keys() == reference[1].keys()
    for key in kernel[1]:
        torch.testing.assert_close(kernel[1][key], reference[1][key], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(kernel[2], reference[2], rtol=1e-9, atol=1e-10)
    assert torch.equal(kernel[3].x, reference[3].x) and torch.equal(kernel[3].node, reference[3].node)


def test_hmm_with_soft_evidence_runs_every_kernel():
    root = pc.structures.hmm(5, 6, 7, seed=1)
    circuit = pc.compile(root, dtype=torch.float32)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.integers(0, 7, size=(8, 5)))
    missing = torch.tensor(rng.random((8, 5)) < 0.5)
    soft = torch.tensor(rng.normal(size=(8, 5, 7)), dtype=torch.float32)
    with _kernels_for_cpu_tensors(circuit) as emulator:
        log_p = _log_sum_log_prob(circuit, x, missing, soft)
        log_p.sum().backward()
        post = circuit.posterior(x, missing=missing, soft_evidence=soft)
        sampled = circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(1))
        launched = set(emulator.launched)
    assert {"pc_sum_dense_fwd_f32", "pc_sum_dense_grad_x_f32", "pc_sum_dense_grad_logw_f32",
            "pc_inverse_cdf_warp_f32"} <= launched
    flows = {k: v.grad.clone() for k, v in circuit.params.items()}
    circuit.zero_grad()
    assert circuit.runtime.last_backend == "cuda"
    ref_log_p = _log_sum_log_prob(circuit, x, missing, soft)
    ref_log_p.sum().backward()
    ref_post = circuit.posterior(x, missing=missing, soft_evidence=soft)
    ref_sampled = circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(1))
    assert circuit.runtime.last_backend == "torch"
    torch.testing.assert_close(log_p, ref_log_p, rtol=1e-5, atol=1e-5)
    for key, value in circuit.params.items():
        torch.testing.assert_close(flows[key], value.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(post, ref_post, rtol=1e-4, atol=1e-5)
    assert torch.equal(sampled, ref_sampled)


def test_sparse_sum_layer_runs_the_padded_sum_kernels():
    leaves = pc.inputs(0, 3, pc.Categorical(4), generator=torch.Generator().manual_seed(0))
    other = pc.inputs(1, 3, pc.Categorical(4), generator=torch.Generator().manual_seed(1))
    products = pc.multiply(leaves, other)
    edges = np.array([[0, 0, 1], [0, 2, 1]])  # node 0 <- children 0, 2; node 1 <- child 1
    mixed = pc.summate(products, num_nodes=2, edges=edges)
    root = pc.summate(mixed, num_nodes=1)
    circuit = pc.compile(root, dtype=torch.float64)
    x = torch.tensor([[0, 1], [3, 2], [2, 2]])
    missing = torch.tensor([[False, True], [False, False], [True, True]])
    with _kernels_for_cpu_tensors(circuit) as emulator:
        log_p = _log_sum_log_prob(circuit, x, missing)
        log_p.sum().backward()
        launched = set(emulator.launched)
    flows = {k: v.grad.clone() for k, v in circuit.params.items()}
    circuit.zero_grad()
    reference = _log_sum_log_prob(circuit, x, missing)
    reference.sum().backward()
    assert {"pc_logsumexp_rows_fwd_f64", "pc_logsumexp_rows_bwd_f64"} <= launched
    torch.testing.assert_close(log_p, reference, rtol=1e-12, atol=1e-12)
    for key, value in circuit.params.items():
        torch.testing.assert_close(flows[key], value.grad, rtol=1e-10, atol=1e-12)


def test_kernels_never_receive_tensors_that_require_grad():
    """The emulated runner refuses a tensor that requires grad, as torch's
    ``__cuda_array_interface__`` (behind ``cupy.asarray``) does on a GPU; the kernel glue
    detaches every argument, so flows under autograd run on the kernels."""
    x = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        _EMULATOR("sum_dense.cu", "pc_sum_dense_fwd_f64", (1, 1, 1), (1, 1, 1), (x,))
    logw = torch.log_softmax(torch.randn(1, 4, 3, dtype=torch.float64), -1).requires_grad_(True)
    with _kernels_for_cpu_tensors():
        y = dispatch.sum_dense(x, logw, backend="cuda")
        y.sum().backward()
    reference = torch.logsumexp(x.detach()[:, :, None, :] + logw.detach()[None], -1)
    torch.testing.assert_close(y.detach(), reference, rtol=1e-12, atol=1e-12)
    assert x.grad is not None and logw.grad is not None


def test_mpe_and_topk_evidence_run_their_kernels():
    """MPE on the tiled max-plus kernel and top-k soft evidence (values, flows, posterior) on the
    top-k kernels give the torch path's answers."""
    root = pc.structures.hmm(4, 5, 40, seed=2)
    circuit = pc.compile(root, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    missing = torch.rand(6, 4, generator=g) < 0.5
    topk = pc.TopKEvidence(torch.randn(6, 4, 3, generator=g, dtype=torch.float64),
                           torch.sort(torch.rand(6, 4, 40, generator=g).argsort(-1)[..., :3], -1).values)
    x = topk.indices[..., 1]  # observed values among the candidates (else probability zero)

    def queries():
        circuit.zero_grad()
        log_p = _log_sum_log_prob(circuit, x, missing, topk)
        log_p.sum().backward()
        flows = {k: v.grad.clone() for k, v in circuit.params.items()}
        return circuit.mpe(x, missing=missing), log_p.detach(), flows, circuit.posterior(x, missing=missing, soft_evidence=topk)

    with _kernels_for_cpu_tensors(circuit) as emulator:
        kernel = queries()
        launched = set(emulator.launched)
    assert {"pc_max_plus_fwd_f64", "pc_categorical_topk_fwd_f64", "pc_categorical_topk_bwd_f64"} <= launched
    reference = queries()
    assert torch.equal(kernel[0], reference[0])
    torch.testing.assert_close(kernel[1], reference[1], rtol=1e-12, atol=1e-12)
    for key in reference[2]:
        torch.testing.assert_close(kernel[2][key], reference[2][key], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kernel[3], reference[3], rtol=1e-10, atol=1e-12)


def test_summed_out_inputs_of_normalised_tables_launch_nothing():
    """Missing categorical variables without evidence contribute log 1 = 0 with no kernel
    launch (before, one padded-sum launch per input layer), and their flows are unchanged."""
    circuit = pc.compile(pc.structures.hmm(4, 3, 6, seed=3), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x, missing = torch.randint(0, 6, (5, 4), generator=g), torch.rand(5, 4, generator=g) < 0.5

    def flows():
        circuit.zero_grad()
        log_p = _log_sum_log_prob(circuit, x, missing)
        log_p.sum().backward()
        return log_p.detach(), {k: v.grad.clone() for k, v in circuit.params.items()}

    with _kernels_for_cpu_tensors(circuit) as emulator:
        kernel = flows()
        assert emulator.launched and not [k for k in emulator.launched if "logsumexp" in k]
    reference = flows()
    torch.testing.assert_close(kernel[0], reference[0], rtol=1e-12, atol=1e-12)
    for key in reference[1]:
        torch.testing.assert_close(kernel[1][key], reference[1][key], rtol=1e-10, atol=1e-12)


def test_choices_in_a_log_space_layer_use_the_fused_gather_of_the_sampling_kernel():
    """A sum reading an input layer that fell back to log space (evidence far below the float32
    range on one variable) hands its log-weights and its children's log-values to the sampling
    kernel, which gathers and adds them itself; the draws equal the torch path's."""
    from pclayer.cuda import ops

    probs = torch.tensor([[0.8, 0.15, 0.05], [0.05, 0.15, 0.8]], dtype=torch.float64)
    a = pc.inputs(0, 1, pc.Categorical(3), generator=torch.Generator().manual_seed(1))
    b = pc.inputs(1, 2, pc.Categorical(3), params={"probs": probs})
    circuit = pc.compile(pc.multiply(a, pc.summate(b, num_nodes=1, generator=torch.Generator().manual_seed(2))),
                         dtype=torch.float32)
    soft = torch.tensor([[[0.0, -1.0, 0.5], [-95.0, -96.0, -94.5]]]).expand(300, -1, -1)
    x = torch.zeros(300, 2, dtype=torch.long)
    missing = torch.ones_like(x, dtype=torch.bool)
    fused = []
    original = ops.inverse_cdf

    def spy(runner, table, uniforms, rows=None, addend=None, addend_rows=None):
        fused.append(addend is not None)
        return original(runner, table, uniforms, rows, addend, addend_rows)

    with _kernels_for_cpu_tensors(circuit), pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "inverse_cdf", spy)
        kernel = circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(4))
    reference = circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(4))
    assert any(fused), "no choice went through the fused gather"
    assert torch.equal(kernel, reference)
