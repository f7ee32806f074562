"""HMM circuits against an independent forward algorithm and Viterbi (numpy float64)."""

from __future__ import annotations

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pclayer.testing import hmm as hmm_ref
from pclayer.testing import reference

pytestmark = pytest.mark.usefixtures("both_programs")  # every property, optimised and plain


@st.composite
def hmm_cases(draw, max_len: int = 7):
    """(init, trans, emit, x, missing, soft-or-None, homogeneous) with random parameters."""
    length = draw(st.integers(1, max_len))
    states = draw(st.integers(1, 4))
    cats = draw(st.integers(2, 3))
    homogeneous = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    init, trans, emit = hmm_ref.random_params(rng, states, cats)
    if not homogeneous:
        trans = np.stack([hmm_ref.random_params(rng, states, cats)[1] for _ in range(max(length - 1, 1))])[: length - 1]
        emit = np.stack([hmm_ref.random_params(rng, states, cats)[2] for _ in range(length)])
        if length == 1:
            trans = np.zeros((0, states, states))
    x = rng.integers(0, cats, size=length)
    missing = rng.random(length) < 0.5
    soft = rng.normal(size=(length, cats)) if draw(st.booleans()) else None
    return init, trans, emit, x, missing, soft, homogeneous


def _circuit(case, length: int, dtype=torch.float64) -> pc.TensorCircuit:
    init, trans, emit, _, _, _, homogeneous = case
    states, cats = emit.shape[-2], emit.shape[-1]
    transition = trans if (homogeneous or length > 1) else None
    root = pc.structures.hmm(length, states, cats, homogeneous=homogeneous, initial=init,
                             transition=transition, emission=emit)
    return pc.compile(root, dtype=dtype)


def _row(a):
    return None if a is None else torch.as_tensor(a)[None]


@given(hmm_cases())
def test_log_prob_matches_forward_algorithm(case):
    init, trans, emit, x, missing, soft, _ = case
    circuit = _circuit(case, len(x))
    observed_only = circuit.log_prob(_row(x)).item()
    assert observed_only == pytest.approx(hmm_ref.forward(init, trans, emit, x), rel=1e-10, abs=1e-12)
    with_missing = circuit.log_prob(_row(x), _row(missing)).item()
    assert with_missing == pytest.approx(hmm_ref.forward(init, trans, emit, x, missing), rel=1e-10, abs=1e-12)
    if soft is not None:
        weighted = circuit.log_prob(_row(x), _row(missing), _row(soft)).item()
        assert weighted == pytest.approx(hmm_ref.forward(init, trans, emit, x, missing, soft), rel=1e-10, abs=1e-12)


@given(hmm_cases())
def test_posterior_matches_forward_algorithm(case):
    init, trans, emit, x, missing, soft, _ = case
    circuit = _circuit(case, len(x))
    post = circuit.posterior(_row(x), _row(missing), _row(soft))[0].numpy()
    np.testing.assert_allclose(post, hmm_ref.posterior(init, trans, emit, x, missing, soft), atol=1e-10)


@given(hmm_cases())
def test_mpe_is_the_viterbi_argmax_over_path_and_missing_values(case):
    init, trans, emit, x, missing, soft, _ = case
    circuit = _circuit(case, len(x))
    decoded = circuit.mpe(_row(x), _row(missing), _row(soft))[0].numpy()
    best, _, viterbi_x = hmm_ref.viterbi(init, trans, emit, x, missing, soft)
    np.testing.assert_array_equal(decoded[~missing], x[~missing])
    # Same optimum value (ties are measure-zero with random parameters, so also the same values).
    assert hmm_ref.joint_log_score(init, trans, emit, decoded, soft) == pytest.approx(best, rel=1e-10, abs=1e-12)
    np.testing.assert_array_equal(decoded, viterbi_x)


@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 3), st.integers(0, 2**31 - 1))
def test_hmm_builder_matches_symbolic_reference_on_all_assignments(length, states, cats, seed):
    root = pc.structures.hmm(length, states, cats, seed=seed)
    assignments, probs = reference.distribution(root)
    circuit = pc.compile(root, dtype=torch.float64)
    log_p = circuit.log_prob(torch.as_tensor(assignments)).detach().numpy()
    np.testing.assert_allclose(log_p, np.log(probs), rtol=1e-10)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_homogeneous_hmm_ties_parameters():
    circuit = pc.compile(pc.structures.hmm(6, 3, 4, seed=0))
    shapes = sorted(tuple(p.shape) for p in circuit.params.values())
    assert shapes == [(1, 1, 3), (1, 3, 3), (1, 3, 4)]


def test_batched_rows_match_row_by_row_forward():
    rng = np.random.default_rng(7)
    init, trans, emit = hmm_ref.random_params(rng, 4, 3)
    circuit = pc.compile(pc.structures.hmm(9, 4, 3, initial=init, transition=trans, emission=emit), dtype=torch.float64)
    x = rng.integers(0, 3, size=(16, 9))
    missing = rng.random((16, 9)) < 0.3
    soft = rng.normal(size=(16, 9, 3))
    result = circuit.log_prob(torch.as_tensor(x), torch.as_tensor(missing), torch.as_tensor(soft)).detach().numpy()
    expected = [hmm_ref.forward(init, trans, emit, x[b], missing[b], soft[b]) for b in range(16)]
    np.testing.assert_allclose(result, expected, rtol=1e-10)
