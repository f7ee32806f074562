"""Scaling benchmarks: time against states, variables and batch size, and compile time
against circuit size. Compare each series with its theoretical cost: the HMM forward does
``(T - 1) * B * H**2`` multiply-adds, so time should grow ~H**2 once the products dominate,
and linearly in T and B; compile time should grow ~linearly in the number of edges.
"""

from __future__ import annotations

import pytest
import torch

import pclayer as pc
from conftest import data, hmm_circuit


@pytest.mark.benchmark(group="scaling-states (T=8, B=512)")
@pytest.mark.parametrize("num_states", [64, 128, 256, 512, 1024, 2048])
def test_forward_vs_states(benchmark, num_states):
    circuit, x = hmm_circuit(8, num_states, 64), data(8, 64)
    benchmark.extra_info["gflop"] = 2 * 7 * 512 * num_states**2 / 1e9
    with torch.no_grad():
        benchmark(circuit.log_prob, x)


@pytest.mark.benchmark(group="scaling-variables (H=64, B=512)")
@pytest.mark.parametrize("num_vars", [8, 32, 128, 512, 1024])
def test_forward_vs_variables(benchmark, num_vars):
    circuit, x = hmm_circuit(num_vars, 64, 16), data(num_vars, 16)
    with torch.no_grad():
        benchmark(circuit.log_prob, x)


@pytest.mark.benchmark(group="scaling-batch (T=32, H=128)")
@pytest.mark.parametrize("batch", [64, 256, 1024, 4096])
def test_forward_vs_batch(benchmark, batch):
    circuit, x = hmm_circuit(32, 128, 256), data(32, 256, batch=batch)
    with torch.no_grad():
        benchmark(circuit.log_prob, x)


@pytest.mark.benchmark(group="roofline (HMM T=32, B=512)")
@pytest.mark.parametrize("num_states", [128, 256, 512])
def test_roofline_forward(benchmark, num_states):
    circuit, x = hmm_circuit(32, num_states, 64), data(32, 64)
    with torch.no_grad():
        benchmark(circuit.log_prob, x)


@pytest.mark.benchmark(group="roofline (HMM T=32, B=512)")
@pytest.mark.parametrize("num_states", [128, 256, 512])
def test_roofline_bare_products(benchmark, num_states):
    """The products alone: (T-1) x (B, H) @ (H, H), one per transition matrix of the
    inhomogeneous HMM; the forward above should be within 2x."""
    a, w = torch.rand(512, num_states), torch.rand(31, num_states, num_states)
    out = torch.empty(512, num_states)

    def products():
        for step in range(31):
            torch.mm(a, w[step], out=out)

    benchmark(products)


@pytest.mark.benchmark(group="compile time vs edges")
@pytest.mark.parametrize("num_states,num_vars", [(16, 40), (64, 40), (128, 64), (256, 160), (512, 40)],
                         ids=["10K", "160K", "1M", "10M-deep", "10M-wide"])
def test_compile_time(benchmark, num_states, num_vars):
    """HMM edges ~ num_vars * num_states**2 (transition) + num_vars * num_states (products)."""
    root = pc.structures.hmm(num_vars, num_states, 4, homogeneous=False, seed=0)
    benchmark.extra_info["edges"] = (num_vars - 1) * num_states**2 + num_vars * num_states
    circuit = benchmark.pedantic(pc.compile, args=(root,), rounds=3, iterations=1)
    assert circuit.num_vars == num_vars


@pytest.mark.benchmark(group="compile time vs edges (sparse sums)")
@pytest.mark.parametrize("num_nodes,fan_in", [(1000, 10), (10000, 10), (10000, 100), (100000, 100)],
                         ids=["10K", "100K", "1M", "10M"])
def test_compile_time_sparse(benchmark, num_nodes, fan_in):
    """One sparse sum group of num_nodes * fan_in explicit edges (the block-sparse layout)."""
    leaves = [pc.inputs(v, num_nodes, pc.Categorical(4), generator=torch.Generator().manual_seed(v)) for v in range(2)]
    parents = torch.arange(num_nodes).repeat_interleave(fan_in)
    children = (parents + torch.arange(fan_in).repeat(num_nodes)) % num_nodes
    middle = pc.summate(pc.multiply(*leaves), num_nodes=num_nodes, edges=torch.stack([parents, children]))
    root = pc.summate(middle, num_nodes=1)
    benchmark.extra_info["edges"] = num_nodes * fan_in
    circuit = benchmark.pedantic(pc.compile, args=(root,), rounds=3, iterations=1)
    assert circuit.num_vars == 2


@pytest.mark.benchmark(group="soft evidence, large vocabulary")
@pytest.mark.parametrize("vocab", [4096, 32768, 126464])
def test_soft_evidence_large_vocab(benchmark, vocab):
    """An HMM (T=8, H=32) over a big vocabulary, all inputs under soft evidence."""
    circuit = hmm_circuit(8, 32, vocab)
    x = data(8, vocab, batch=8)
    evidence = torch.randn(8, 8, vocab, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = benchmark(circuit.log_prob, x, None, evidence)
    assert torch.isfinite(out).all()
