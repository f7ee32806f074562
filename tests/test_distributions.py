"""Input distributions own their behaviour: ``Binomial(n)`` through every query, EM and
save/load, and a distribution defined in this file (one class, nothing else) through every
query and EM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pclayer as pc
import pytest
import torch
from scipy import stats

from pclayer.distributions import Distribution, smoothed_table_update
from pclayer.inspection import describe
from pclayer.learn import FullBatchEM
from pclayer.testing import reference

F64 = torch.float64


@dataclass(frozen=True)
class Mirrored(Distribution):
    """A toy distribution for this test only: over ``num_cats`` values, symmetric under
    ``k -> K - 1 - k``; parameter ``probs`` (num_nodes, ceil(K / 2)), the mass of each mirrored
    pair (the middle value of an odd K is its own pair)."""

    num_cats: int
    bank_prefix: ClassVar[str] = "mirror"

    @property
    def half(self) -> int:
        return (self.num_cats + 1) // 2

    def _pair_of(self) -> torch.Tensor:
        k = torch.arange(self.num_cats)
        return torch.minimum(k, self.num_cats - 1 - k)

    def _pair_sizes(self, like: torch.Tensor) -> torch.Tensor:
        return torch.bincount(self._pair_of(), minlength=self.half).to(like)

    def init_params(self, num_nodes, generator):
        return {"probs": pc.distributions.random_probabilities((num_nodes, self.half), generator)}

    def check_params(self, params, num_nodes):
        return {"probs": torch.as_tensor(params["probs"], dtype=F64)}

    def to_bank(self, params):
        return torch.log(params["probs"])

    @classmethod
    def from_bank(cls, num_cats):
        return cls(num_cats)

    def log_table(self, bank):
        pairs = torch.log_softmax(bank, dim=-1) - torch.log(self._pair_sizes(bank))
        return pairs[..., self._pair_of().to(bank.device)]

    def m_step(self, bank, counts, step_size, pseudocount):
        pair_counts = torch.zeros(*counts.shape[:-1], self.half, dtype=counts.dtype).index_add_(
            -1, self._pair_of(), counts)
        new = smoothed_table_update(torch.softmax(bank, dim=-1), pair_counts, None, step_size, pseudocount)
        bank.copy_(torch.log(new))
        return torch.exp(self.log_table(bank))


def _dag(leaf) -> pc.NodeGroup:
    g = torch.Generator().manual_seed(4)
    a = [pc.inputs(v, 2, leaf, generator=g) for v in range(3)]
    pair = pc.summate(pc.multiply(a[0], a[1]), num_nodes=2, generator=g)
    sparse = pc.summate(pc.multiply(pair, a[2]), num_nodes=2, edges=[[0, 0, 1], [0, 1, 1]], generator=g)
    return pc.summate(sparse, num_nodes=1, generator=g)


@pytest.mark.parametrize("case", ["binomial", "mirrored"])
def test_every_query_matches_brute_force(case):
    """The float64 reference walks the symbolic circuit; the toy distribution, which it does
    not know, enters it through the circuit's view (its compiled normalised table)."""
    leaf, k = (pc.Binomial(3), 4) if case == "binomial" else (Mirrored(5), 5)
    root = _dag(leaf)
    circuit = pc.compile(root, dtype=F64)
    view = describe(root, circuit)
    assignments, probs = reference.distribution(view)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(0)
    x = rng.integers(0, k, size=(6, 3))
    missing = rng.random((6, 3)) < 0.5
    soft = rng.normal(size=(6, 3, k))
    xt, mt, st_ = torch.as_tensor(x), torch.as_tensor(missing), torch.as_tensor(soft)
    np.testing.assert_allclose(circuit.log_prob(xt, mt, st_).detach().numpy(),
                               reference.log_prob(view, x, missing, soft), rtol=1e-10)
    np.testing.assert_allclose(circuit.posterior(xt, mt, st_).numpy(), reference.posterior(view, x, missing, soft),
                               atol=1e-10)
    # samples: the conditional distribution of (x_0, x_1) given x_2 by a chi-square test (false alarm 1e-3)
    row_missing = np.array([[True, True, False]])
    draws = circuit.sample(2000, x=xt[:1], missing=torch.as_tensor(row_missing), soft_evidence=st_[:1],
                           generator=torch.Generator().manual_seed(1)).numpy()
    observed = np.bincount(draws[:, 0] * k + draws[:, 1], minlength=k * k)
    pairs = np.array([[a, b, x[0, 2]] for a in range(k) for b in range(k)])
    expected = np.exp(reference.log_prob(view, pairs, None, np.repeat(soft[:1], len(pairs), 0)))
    keep = expected > 0
    assert observed[~keep].sum() == 0
    assert stats.chisquare(observed[keep], expected[keep] / expected[keep].sum() * len(draws)).pvalue > 1e-3
    # MPE: the decoded completion maximises the value of the best latent choices
    decoded = circuit.mpe(xt, mt, st_)
    assert torch.equal(decoded[~mt], xt[~mt])
    value = reference.log_prob(view, decoded.numpy(), None, soft, max_product=True)
    np.testing.assert_allclose(value, reference.mpe(view, x, missing, soft).log_value, rtol=1e-9)


@pytest.mark.parametrize("case", ["binomial", "mirrored"])
def test_em_never_lowers_the_likelihood_and_saves(case, tmp_path):
    leaf, k = (pc.Binomial(3), 4) if case == "binomial" else (Mirrored(5), 5)
    circuit = pc.compile(_dag(leaf), dtype=F64)
    data = torch.randint(0, k, (300, 3), generator=torch.Generator().manual_seed(2))
    missing = torch.rand(300, 3, generator=torch.Generator().manual_seed(3)) < 0.2
    previous = -math.inf
    for _ in range(5):
        em = FullBatchEM(circuit, pseudocount=0.1)
        em.accumulate(data, missing)
        em.step()
        value = circuit.log_prob(data, missing).mean().item()
        assert value >= previous - 1e-10
        previous = value
    path = tmp_path / "c.safetensors"
    pc.save(path, circuit)
    assert torch.equal(pc.load(path).log_prob(data, missing), circuit.log_prob(data, missing))


def test_binomial_table_is_the_binomial_pmf():
    p = torch.tensor([0.1, 0.5, 0.93], dtype=F64)
    circuit = pc.compile(pc.summate(pc.inputs(0, 3, pc.Binomial(255), params={"p": p}), num_nodes=1), dtype=F64)
    table = torch.exp(circuit.log_tables()["binom_3x256"][0]).detach()
    expected = stats.binom.pmf(np.arange(256)[None], 255, p.numpy()[:, None])
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-9, atol=1e-300)


def test_binomial_em_step_is_the_expected_success_rate():
    """One exact M-step on a single binomial leaf sets p to mean(x) / n (and pseudocounts add
    p = 1/2 pseudo-observations)."""
    circuit = pc.compile(pc.summate(pc.inputs(0, 1, pc.Binomial(4), params={"p": torch.tensor([0.2])}), num_nodes=1),
                         dtype=F64)
    x = torch.tensor([[0], [4], [3], [3]])
    for pseudocount, expected in ((0.0, 10 / 16), (2.0, (10 / 4 + 0.5 * 2) / (4 + 2))):
        em = FullBatchEM(circuit, pseudocount=pseudocount)
        em.accumulate(x)
        em.step()
        p = torch.sigmoid(circuit.params["binom_1x5"]).item()
        assert p == pytest.approx(expected, rel=1e-10)


def test_binomial_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n: expected a positive int"):
        pc.Binomial(0)
    with pytest.raises(ValueError, match=r"params\['p'\]: expected probabilities in \(0, 1\)"):
        pc.inputs(0, 2, pc.Binomial(3), params={"p": [0.5, 1.0]})
    with pytest.raises(ValueError, match="out of range"):
        pc.compile(pc.summate(pc.inputs(0, 2, pc.Binomial(3)), num_nodes=1)).log_prob(torch.tensor([[4]]))
