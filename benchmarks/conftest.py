"""Shared fixtures of the pytest-benchmark suites (run: ``pytest benchmarks --benchmark-only``).

Not collected by the default ``pytest`` run (``testpaths = ["tests"]``). Timings on a shared
machine are noisy: compare groups measured in one run (``--benchmark-group-by=group``).
"""

from __future__ import annotations

import pytest
import torch

import pclayer as pc

BATCH = 512


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """Two intra-op threads, as in the issue's measurements."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def hmm_circuit(num_vars: int = 32, num_states: int = 128, num_cats: int = 256) -> pc.TensorCircuit:
    """Inhomogeneous HMM (the issue's reference model: 1.56 M parameters at the defaults)."""
    return pc.compile(pc.structures.hmm(num_vars, num_states, num_cats, homogeneous=False, seed=0))


def data(num_vars: int, num_cats: int, batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    """(batch, num_vars) random categories."""
    return torch.randint(0, num_cats, (batch, num_vars), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hmm():
    """(circuit, x) for the reference HMM: T=32, H=128, K=256, B=512."""
    return hmm_circuit(), data(32, 256)


@pytest.fixture(scope="module")
def hclt():
    """(circuit, x) for an HCLT of 1.55 M parameters (V=32, H=128, K=256)."""
    x = data(32, 256)
    return pc.compile(pc.structures.hclt(x, 128, 256, seed=0)), x


@pytest.fixture(scope="module")
def rat():
    """(circuit, x) for a RAT-SPN of 1.50 M parameters (V=32, K=256, depth 4, 8 repetitions, 16 states)."""
    return pc.compile(pc.structures.rat_spn(32, 256, 4, 8, 16, seed=0)), data(32, 256)
