"""The compiled program's fast paths (column reads instead of gathers, split outputs and
weight tables, in-place log-matmul-exp) give exactly what the generic gather path gives:
values and gradients, on random circuits and on the structures the benchmarks use."""

from __future__ import annotations

import importlib

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import evidence, random_circuits
from pclayer.layers import ProductLayer, SumLayer


def _generic_copy(root: pc.NodeGroup) -> pc.TensorCircuit:
    """The same circuit compiled with every fast path switched off."""
    circuit = pc.compile(root, dtype=torch.float64)
    for layer in circuit.layers:
        if isinstance(layer, ProductLayer):
            layer.column_reads = None
            layer.outer = None
        if isinstance(layer, SumLayer):
            for spec in layer.dense:
                spec["start"] = None
    circuit.output_cuts = {}
    circuit.split_tables = []
    return circuit


def _values_and_grads(circuit: pc.TensorCircuit, args) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    circuit.zero_grad(set_to_none=True)
    out = circuit.log_prob(*args)
    finite = torch.isfinite(out)
    if out.requires_grad:  # circuits of indicators only have no parameters
        out[finite].sum().backward()
    grads = {k: (torch.zeros_like(p) if p.grad is None else p.grad).numpy() for k, p in circuit.params.items()}
    return out.detach().numpy(), grads


def _assert_same(root: pc.NodeGroup, args) -> None:
    fast = pc.compile(root, dtype=torch.float64)
    generic = _generic_copy(root)
    v_fast, g_fast = _values_and_grads(fast, args)
    v_gen, g_gen = _values_and_grads(generic, args)
    np.testing.assert_allclose(v_fast, v_gen, rtol=1e-12, atol=1e-12)
    for key in g_gen:
        np.testing.assert_allclose(g_fast[key], g_gen[key], rtol=1e-10, atol=1e-12, err_msg=key)


@settings(max_examples=40, deadline=None)
@given(random_circuits(), st.data())
def test_fast_paths_match_generic_path_on_random_circuits(root, data):
    x, missing, weights = data.draw(evidence(ref.variable_cats(root), batch=4))
    args = (torch.as_tensor(x), torch.as_tensor(missing), None if weights is None else torch.as_tensor(weights))
    _assert_same(root, args)


@pytest.mark.parametrize("homogeneous", [True, False])
def test_fast_paths_match_generic_path_on_hmm(homogeneous):
    root = pc.structures.hmm(6, 5, 4, homogeneous=homogeneous, seed=0)
    x = torch.randint(0, 4, (7, 6), generator=torch.Generator().manual_seed(0))
    missing = torch.rand(7, 6, generator=torch.Generator().manual_seed(1)) < 0.3
    _assert_same(root, (x, missing, None))


def test_fast_paths_are_used_on_the_benchmark_hmm():
    """Guards the speed-ups: products read columns, the input output is split per position,
    per-position transition tables are unbound views."""
    circuit = pc.compile(pc.structures.hmm(5, 4, 3, homogeneous=False, seed=0))
    products = [layer for layer in circuit.layers if isinstance(layer, ProductLayer)]
    assert products and all(layer.column_reads is not None for layer in products)
    assert circuit.output_cuts[0] == [4] * 5
    assert circuit.split_tables


def test_fast_paths_match_generic_path_on_rat_spn_and_hclt():
    x = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    rat = pc.compile(pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0))
    assert any(layer.outer is not None for layer in rat.layers if isinstance(layer, ProductLayer))
    _assert_same(pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0), (x, None, None))
    _assert_same(pc.structures.hclt(x, 3, 3, seed=0), (x, None, None))


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_log_matmul_exp_matches_one_shot(monkeypatch, shared):
    """Chunking the child dimension (bounded memory for huge vocabularies) changes nothing:
    values and both gradients agree with the one-shot product, including -inf children."""
    lme = importlib.import_module("pclayer.ops.log_matmul_exp")

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2500, generator=gen, dtype=torch.float64) * 3
    x[0, 0, :2000] = -torch.inf
    logw = torch.log_softmax(torch.randn(1 if shared else 2, 4, 2500, generator=gen, dtype=torch.float64), -1)
    grad = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)

    def run():
        xs, ws = x.clone().requires_grad_(), logw.clone().requires_grad_()
        y = lme.log_matmul_exp(xs, ws)
        y.backward(grad)
        return y.detach(), xs.grad, ws.grad

    one_shot = run()
    monkeypatch.setattr(lme, "_CHUNK_ELEMENTS", 1)  # -> chunks of 1024 columns
    assert len(lme._chunks(x, logw)) == 3
    chunked = run()
    for a, b in zip(one_shot, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
