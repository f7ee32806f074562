"""Benchmarks of every query on the reference structures (HMM, HCLT, RAT-SPN)."""

from __future__ import annotations

import pytest
import torch

STRUCTURES = ["hmm", "hclt", "rat"]


@pytest.fixture(params=STRUCTURES)
def model(request):
    return request.getfixturevalue(request.param)


def _missing_half(x: torch.Tensor) -> torch.Tensor:
    missing = torch.zeros_like(x, dtype=torch.bool)
    missing[:, ::2] = True
    return missing


@pytest.mark.benchmark(group="log_prob")
def test_log_prob(benchmark, model):
    circuit, x = model
    with torch.no_grad():
        out = benchmark(circuit.log_prob, x)
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="marginal")
def test_marginal(benchmark, model):
    circuit, x = model
    missing = _missing_half(x)
    with torch.no_grad():
        out = benchmark(circuit.log_prob, x, missing)
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="soft_evidence")
def test_soft_evidence(benchmark, model):
    circuit, x = model
    evidence = torch.randn(x.shape[0], x.shape[1], circuit.num_cats, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = benchmark(circuit.log_prob, x, None, evidence)
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="posterior")
def test_posterior(benchmark, model):
    circuit, x = model
    small = x[:128]
    out = benchmark(circuit.posterior, small, _missing_half(small))
    assert out.shape == (128, x.shape[1], circuit.num_cats)


@pytest.mark.benchmark(group="sample")
def test_sample(benchmark, model):
    circuit, _ = model
    generator = torch.Generator().manual_seed(3)
    out = benchmark(lambda: circuit.sample(128, generator=generator))
    assert out.shape == (128, circuit.num_vars)


@pytest.mark.benchmark(group="conditional_sample")
def test_conditional_sample(benchmark, model):
    circuit, x = model
    small = x[:128]
    generator = torch.Generator().manual_seed(4)
    out = benchmark(lambda: circuit.sample(x=small, missing=_missing_half(small), generator=generator))
    assert out.shape == small.shape


@pytest.mark.benchmark(group="mpe")
def test_mpe(benchmark, model):
    circuit, x = model
    small = x[:128]
    out = benchmark(circuit.mpe, small, _missing_half(small))
    assert out.shape == small.shape
