"""check_circuit: passes on correct circuits, and every property reports a planted bug.

Each planted bug is a wrapper around a correct compiled circuit that changes one public
method the way a real bug would; the test expects the matching property in the report.
"""

from __future__ import annotations

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given, settings

from pclayer.testing import PROPERTIES, check_circuit
from pclayer.testing.strategies import circuits, deterministic_circuits


def _chain(num_vars: int = 3, cats: int = 3, seed: int = 0) -> pc.NodeGroup:
    """A sticky HMM: neighbouring variables depend strongly on each other."""
    rng = np.random.default_rng(seed)
    states = cats
    transition = np.full((states, states), 0.05 / (states - 1)) + np.eye(states) * (0.95 - 0.05 / (states - 1))
    emission = np.full((states, cats), 0.1 / (cats - 1)) + np.eye(states, cats) * (0.9 - 0.1 / (cats - 1))
    initial = rng.dirichlet(np.ones(states))
    return pc.structures.hmm(num_vars, states, cats, initial=initial, transition=transition, emission=emission)


class Wrapper:
    """A user-style wrapper: forwards everything to a compiled circuit."""

    def __init__(self, inner: pc.TensorCircuit):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def log_prob(self, x, missing=None, soft_evidence=None):
        return self.inner.log_prob(x, missing, soft_evidence)

    def posterior(self, x, missing=None, soft_evidence=None):
        return self.inner.posterior(x, missing, soft_evidence)

    def sample(self, num_samples=None, *, x=None, missing=None, soft_evidence=None, generator=None):
        return self.inner.sample(num_samples, x=x, missing=missing, soft_evidence=soft_evidence, generator=generator)

    def mpe(self, x, missing=None, soft_evidence=None):
        return self.inner.mpe(x, missing, soft_evidence)


class UnnormalisedSum(Wrapper):
    """A root sum whose weights add up to 1.2: mixes two circuits with weights 0.7 and 0.5."""

    def __init__(self, inner, other):
        super().__init__(inner)
        self.other = other

    def log_prob(self, x, missing=None, soft_evidence=None):
        first = self.inner.log_prob(x, missing, soft_evidence) + np.log(0.7)
        second = self.other.log_prob(x, missing, soft_evidence) + np.log(0.5)
        return torch.logaddexp(first, second)


class WrongMarginalAt(Wrapper):
    """Summing out variable ``var`` (while another variable is observed) takes the value of
    ``x_var = 0`` instead of the sum over its values."""

    def __init__(self, inner, var):
        super().__init__(inner)
        self.var = var

    def log_prob(self, x, missing=None, soft_evidence=None):
        if missing is None:
            return self.inner.log_prob(x, missing, soft_evidence)
        affected = missing[:, self.var] & ~missing.all(1)
        x2, missing2 = x.clone(), missing.clone()
        x2[affected, self.var] = 0
        missing2[affected, self.var] = False
        return self.inner.log_prob(x2, missing2, soft_evidence)


class IgnoresObservedSoftEvidence(Wrapper):
    """Drops the soft evidence of observed variables."""

    def log_prob(self, x, missing=None, soft_evidence=None):
        if soft_evidence is not None and missing is not None:
            soft_evidence = torch.where(missing[..., None], soft_evidence, torch.zeros_like(soft_evidence))
        elif soft_evidence is not None:
            soft_evidence = torch.zeros_like(soft_evidence)
        return self.inner.log_prob(x, missing, soft_evidence)


class PosteriorWithoutSoftEvidence(Wrapper):
    def posterior(self, x, missing=None, soft_evidence=None):
        return self.inner.posterior(x, missing)


class MpeOffByOne(Wrapper):
    """Moves the first decoded (missing) variable of every row to the next value."""

    def mpe(self, x, missing=None, soft_evidence=None):
        decoded = self.inner.mpe(x, missing, soft_evidence)
        if missing is None:
            return decoded
        rows = torch.nonzero(missing.any(1)).flatten()
        first = missing.long().argmax(1)[rows]
        cats = self.inner.var_cats[first]
        decoded[rows, first] = (decoded[rows, first] + 1) % cats
        return decoded


class SamplerIgnoresEvidence(Wrapper):
    """Draws every variable unconditionally, then writes the observed values back."""

    def sample(self, num_samples=None, *, x=None, missing=None, soft_evidence=None, generator=None):
        if x is None:
            return self.inner.sample(num_samples, soft_evidence=soft_evidence, generator=generator)
        drawn = self.inner.sample(x.shape[0] if num_samples is None else num_samples, generator=generator)
        return torch.where(missing, drawn, x) if missing is not None else x.expand_as(drawn).clone()


class FlowWithWrongSign(Wrapper):
    """Right values, gradients of the opposite sign."""

    def log_prob(self, x, missing=None, soft_evidence=None):
        value = self.inner.log_prob(x, missing, soft_evidence)
        return 2 * value.detach() - value


def _violations(circuit, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        check_circuit(circuit, **kwargs)
    return str(info.value)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request):
    return request.param


def test_correct_circuits_pass_every_property(dtype):
    for root in (_chain(), pc.structures.hmm(12, 4, 3, seed=1), pc.structures.rat_spn(8, 3, 2, 2, 3, seed=2)):
        report = check_circuit(pc.compile(root, dtype=dtype))
        assert set(report.comparisons) == set(PROPERTIES)
        assert all(count > 0 for count in report.comparisons.values())


def test_a_correct_wrapper_passes():
    check_circuit(Wrapper(pc.compile(_chain(), dtype=torch.float64)))


def test_unnormalised_sum_is_reported_by_normalisation(dtype):
    bug = UnnormalisedSum(pc.compile(_chain(seed=0), dtype=dtype), pc.compile(_chain(seed=1), dtype=dtype))
    for enumeration in (4096, 1):  # with and without the exhaustive check
        assert "[normalisation]" in _violations(bug, max_enumeration=enumeration)


def test_wrong_marginal_in_one_position_is_reported_by_marginal_consistency(dtype):
    bug = WrongMarginalAt(pc.compile(_chain(4), dtype=dtype), var=2)
    assert "[marginal_consistency]" in _violations(bug, properties=["marginal_consistency"])
    bug = WrongMarginalAt(pc.compile(_chain(6), dtype=dtype), var=2)  # without enumeration
    assert "[marginal_consistency]" in _violations(bug, properties=["marginal_consistency"], max_enumeration=1, rows=16)


def test_ignored_soft_evidence_is_reported_by_soft_evidence(dtype):
    bug = IgnoresObservedSoftEvidence(pc.compile(_chain(), dtype=dtype))
    assert "[soft_evidence]" in _violations(bug, properties=["soft_evidence"], max_enumeration=1)


def test_posterior_without_soft_evidence_is_reported_by_posterior(dtype):
    bug = PosteriorWithoutSoftEvidence(pc.compile(_chain(5), dtype=dtype))
    assert "[posterior]" in _violations(bug, properties=["posterior"], max_enumeration=1)


def test_mpe_off_by_one_variable_is_reported_by_mpe(dtype):
    bug = MpeOffByOne(pc.compile(_chain(5), dtype=dtype))
    assert "[mpe]" in _violations(bug, properties=["mpe"], max_enumeration=1)
    assert "[mpe]" in _violations(bug, properties=["mpe"], mpe="exact")


def test_sampler_ignoring_evidence_is_reported_by_sampling(dtype):
    bug = SamplerIgnoresEvidence(pc.compile(_chain(4), dtype=dtype))
    message = _violations(bug, properties=["sampling"], max_enumeration=1)
    assert "[sampling]" in message and "conditional" in message


def test_flow_with_wrong_sign_is_reported_by_flows(dtype):
    bug = FlowWithWrongSign(pc.compile(_chain(), dtype=dtype))
    message = _violations(bug)
    assert "[flows]" in message
    assert all(f"[{name}]" not in message for name in PROPERTIES if name != "flows")  # values are right


def test_report_lists_every_violation_with_its_inputs():
    message = _violations(UnnormalisedSum(pc.compile(_chain(), dtype=torch.float64),
                                          pc.compile(_chain(seed=1), dtype=torch.float64)))
    assert message.startswith("check_circuit: ")
    assert "x=[" in message and "missing=" in message


def test_parameters_are_restored_bit_for_bit():
    circuit = pc.compile(_chain(), dtype=torch.float32)
    before = {key: value.detach().clone() for key, value in circuit.named_parameters()}
    check_circuit(circuit, properties=["flows"])
    for key, value in circuit.named_parameters():
        assert torch.equal(value, before[key])


def test_bad_arguments_are_named():
    circuit = pc.compile(_chain())
    with pytest.raises(ValueError, match="mpe: expected one of"):
        check_circuit(circuit, mpe="viterbi")
    with pytest.raises(ValueError, match="properties: expected a non-empty subset"):
        check_circuit(circuit, properties=["normalization"])
    with pytest.raises(ValueError, match="alpha: expected a float in"):
        check_circuit(circuit, alpha=0.0)
    with pytest.raises(TypeError, match="circuit: expected a compiled circuit with 'num_vars'"):
        check_circuit(object())
    gauss = pc.compile(pc.inputs(0, 1, pc.Gaussian()))
    with pytest.raises(ValueError, match="discrete variables only"):
        check_circuit(gauss)


@settings(max_examples=15)
@given(circuits(builders=True))
def test_random_correct_circuits_pass(root):
    check_circuit(pc.compile(root, dtype=torch.float64), num_samples=300)


@settings(max_examples=10)
@given(deterministic_circuits())
def test_random_deterministic_circuits_pass_with_exact_mpe(root):
    check_circuit(pc.compile(root, dtype=torch.float64), num_samples=300, mpe="exact")


def test_sampling_power_is_the_noncentral_chi_square_power():
    """The default number of draws comes from the power of Pearson's test against a
    deviation of total variation 0.25 (noncentrality >= 4 n TV^2), checked against scipy."""
    from scipy import stats

    from pclayer.testing.check import _detectable_deviation, _detection_probability, _samples_for

    for samples, deviation, level, dof in ((300, 0.25, 1e-4 / 18, 15), (50, 0.4, 1e-3, 7), (1000, 0.1, 1e-6, 3)):
        expected = stats.ncx2.sf(stats.chi2.isf(level, dof), dof, 4 * samples * deviation ** 2)
        assert _detection_probability(samples, deviation, level, dof) == pytest.approx(expected, abs=1e-9)
    n = _samples_for(0.25, 1e-4 / 18, 15)
    assert _detection_probability(n, 0.25, 1e-4 / 18, 15) >= 0.99 > _detection_probability(n - 1, 0.25, 1e-4 / 18, 15)
    assert _detectable_deviation(n, 1e-4 / 18, 15) == pytest.approx(0.25, abs=1e-3)


def test_report_states_what_each_property_subsampled():
    report = check_circuit(pc.compile(_chain(6), dtype=torch.float64), max_enumeration=1)
    assert set(report.notes) == set(PROPERTIES) - {"normalisation"}
    assert "300 draws in each of 3 settings" in report.notes["sampling"]
    assert "total variation 0.25" in report.notes["sampling"]
    assert report.notes["sampling"] in report.summary()
    smaller = check_circuit(pc.compile(_chain(6), dtype=torch.float64), max_enumeration=1, num_samples=100,
                            properties=["sampling"])
    assert "100 draws in each of 3 settings" in smaller.notes["sampling"]
    assert "total variation 0.25 " not in smaller.notes["sampling"]  # fewer draws detect only larger deviations
