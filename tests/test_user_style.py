"""A user's property-based test of their own circuit, written with the documented API only
(pclayer, pclayer.testing, pclayer.testing.strategies, pclayer.inspection): nothing private."""

from __future__ import annotations

import numpy as np
import pclayer as pc
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pclayer.inspection import describe
from pclayer.testing import check_circuit, reference
from pclayer.testing.strategies import evidence


def naive_bayes_mixture(num_vars: int, num_cats: int, components: int, seed: int) -> pc.NodeGroup:
    """The user's circuit: a mixture of fully factorised components, one shared leaf group per
    variable, and a sparse root that skips the last component."""
    generator = torch.Generator().manual_seed(seed)
    leaves = [pc.inputs(v, components, pc.Categorical(num_cats), generator=generator) for v in range(num_vars)]
    factors = pc.multiply(*leaves)
    if components == 1:
        return pc.summate(factors, num_nodes=1)
    kept = list(range(components - 1))
    return pc.summate(factors, num_nodes=1, edges=[[0] * len(kept), kept], generator=generator)


@settings(max_examples=10)
@given(st.integers(1, 4), st.integers(2, 3), st.integers(1, 3), st.integers(0, 1000), st.data())
def test_my_circuit_answers_every_query_like_the_reference(num_vars, num_cats, components, seed, data):
    root = naive_bayes_mixture(num_vars, num_cats, components, seed)
    circuit = pc.compile(root, dtype=torch.float64)
    x, missing, soft = data.draw(evidence(root, batch=4))
    args = [None if a is None else torch.as_tensor(a) for a in (x, missing, soft)]
    np.testing.assert_allclose(circuit.log_prob(*args).detach().numpy(), reference.log_prob(root, x, missing, soft),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(circuit.posterior(*args).numpy(), reference.posterior(root, x, missing, soft), atol=1e-9)
    best = reference.mpe(root, x, missing, soft)
    decoded = circuit.mpe(*args).numpy()
    np.testing.assert_allclose(reference.log_prob(root, decoded, None, soft, max_product=True), best.log_value, rtol=1e-9)
    check_circuit(circuit, seed=seed, num_samples=300)


def test_my_trained_circuit_still_matches_the_reference():
    root = naive_bayes_mixture(3, 3, 3, seed=0)
    circuit = pc.compile(root, dtype=torch.float64)
    x = torch.randint(0, 3, (64, 3), generator=torch.Generator().manual_seed(1))
    pc.learn.fit(circuit, x, epochs=2, batch_size=64, method="em", progress=False)
    view = describe(root, circuit)  # the trained, normalised parameters
    assert view.root.params["weights"][0, 2] == 0.0  # the skipped component stays out
    np.testing.assert_allclose(reference.log_prob(view, x.numpy()), circuit.log_prob(x).detach().numpy(), rtol=1e-9)
    check_circuit(circuit)
