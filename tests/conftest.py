"""Hypothesis profile of the suite. Strategies and references live in pclayer.testing."""

from __future__ import annotations

import pclayer as pc
import pytest
from hypothesis import HealthCheck, settings

# The default profile is derandomized so CI runs the same examples every time;
# `pytest --hypothesis-profile=thorough` explores many more, freshly random ones.
settings.register_profile(
    "pclayer",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("pclayer"), max_examples=400, derandomize=False)
settings.load_profile("pclayer")


@pytest.fixture(params=[True, False], ids=["optimized", "plain"])
def both_programs(request, monkeypatch):
    """Run a test module's circuits compiled both with and without the optimisation passes:
    ``pc.compile`` defaults to the parameter's ``optimize`` setting."""
    original = pc.compile

    def compile_with(root, *args, **kwargs):
        kwargs.setdefault("optimize", request.param)
        return original(root, *args, **kwargs)

    monkeypatch.setattr(pc, "compile", compile_with)
    return request.param


def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo process groups in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
