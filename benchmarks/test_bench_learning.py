"""Benchmarks of learning steps: gradient, flows, mini-batch EM, full-batch EM."""

from __future__ import annotations

import pytest

from pclayer.learn import FullBatchEM, MiniBatchEM, compute_flows

STRUCTURES = ["hmm", "hclt", "rat"]


@pytest.fixture(params=STRUCTURES)
def model(request):
    return request.getfixturevalue(request.param)


@pytest.mark.benchmark(group="forward+backward")
def test_forward_backward(benchmark, model):
    circuit, x = model

    def step():
        circuit.zero_grad(set_to_none=True)
        circuit.log_prob(x).sum().backward()

    benchmark(step)
    assert all(p.grad is not None for p in circuit.params.values())


@pytest.mark.benchmark(group="flows")
def test_flows(benchmark, model):
    circuit, x = model
    flows = benchmark(compute_flows, circuit, x)
    assert float(flows.weight) == x.shape[0]


@pytest.mark.benchmark(group="minibatch_em")
def test_minibatch_em_step(benchmark, model):
    circuit, x = model
    em = MiniBatchEM(circuit, step_size=0.1)
    ll = benchmark(em.step, x)
    assert ll == ll  # not NaN


@pytest.mark.benchmark(group="fullbatch_em")
def test_fullbatch_em_epoch(benchmark, model):
    circuit, x = model
    em = FullBatchEM(circuit)

    def epoch():
        for chunk in x.split(128):
            em.accumulate(chunk)
        return em.step()

    ll = benchmark(epoch)
    assert ll == ll
