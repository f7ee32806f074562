"""A discrete input summed out without evidence: zeros without reading the table, with the
gradient of log-sum-exp (the expected counts EM needs)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pclayer.ops.normalised_mass import normalised_log_mass


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**31))
def test_value_and_gradient_equal_logsumexp_of_a_normalised_table(groups, nodes, cats, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(groups, nodes, cats, generator=g, dtype=dtype) * 3
    raw[..., -1] = -torch.inf if cats > 1 else raw[..., -1]  # categories beyond a variable's are -inf
    table = torch.log_softmax(raw, -1).requires_grad_()
    grad = torch.randn(groups, nodes, generator=g, dtype=dtype)
    expected = torch.logsumexp(table, -1)
    (expected_grad,) = torch.autograd.grad(expected, table, grad)
    mass = normalised_log_mass(table)
    assert torch.equal(mass, torch.zeros_like(expected))
    torch.testing.assert_close(mass.detach(), expected.detach(), atol=8 * torch.finfo(dtype).eps, rtol=0)
    (mass_grad,) = torch.autograd.grad(mass, table, grad)
    torch.testing.assert_close(mass_grad, expected_grad)


def test_bad_table_is_a_clear_error():
    with pytest.raises(ValueError, match="log_table: expected a floating tensor"):
        normalised_log_mass(torch.zeros(3, dtype=torch.long))
