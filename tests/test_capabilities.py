"""The README's capability table (structure x query) is kept true: every ticked cell is run
here on a small instance of that structure and checked against brute force or an invariant."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

import pclayer as pc
from pclayer.learn import FullBatchEM

README = Path(__file__).resolve().parents[1] / "README.md"
K = 2


def _hand_built() -> pc.NodeGroup:
    g = torch.Generator().manual_seed(0)
    a = [pc.inputs(v, 2, pc.Categorical(K), generator=g) for v in range(3)]
    ind = pc.inputs(3, 2, pc.Indicator(K))
    left = pc.summate(pc.multiply(a[0], a[1]), num_nodes=2, generator=g)
    shared = pc.multiply(a[2], ind)
    product = pc.multiply(left, shared)
    sparse = pc.summate(product, num_nodes=2, edges=[[0, 1, 1], [0, 0, 1]], generator=g)
    return pc.summate(sparse, pc.multiply(pc.summate(pc.multiply(a[0], a[1]), num_nodes=2, generator=g), shared),
                      num_nodes=1, generator=g)


def _data(num_vars: int, k: int = K) -> torch.Tensor:
    return torch.randint(0, k, (200, num_vars), generator=torch.Generator().manual_seed(1))


def _binomial_dag() -> pc.NodeGroup:
    """A hand-built DAG over three 2-trial binomial variables (values 0, 1, 2)."""
    g = torch.Generator().manual_seed(2)
    a = [pc.inputs(v, 2, pc.Binomial(2), generator=g) for v in range(3)]
    pair = pc.summate(pc.multiply(a[0], a[1]), num_nodes=2, generator=g)
    return pc.summate(pc.multiply(pair, a[2]), pc.multiply(pair, pc.inputs(2, 2, pc.Binomial(2), generator=g)),
                      num_nodes=1, generator=g)


BUILDERS = {
    "hand-built DAG": _hand_built,
    "hand-built DAG, Binomial inputs": _binomial_dag,
    "hmm": lambda: pc.structures.hmm(4, 3, K, seed=0),
    "hclt": lambda: pc.structures.hclt(_data(4), 3, K, seed=0),
    "rat_spn": lambda: pc.structures.rat_spn(4, K, 1, 2, 2, seed=0),
    "poon_domingos": lambda: pc.structures.poon_domingos((2, 2), K, 1, 2, seed=0),
    "mixture": lambda: pc.structures.mixture(pc.structures.hmm(4, 2, K, seed=1), pc.structures.rat_spn(4, K, 1, 1, 2, seed=2)),
}


def _all(num_vars: int, k: int = K) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(k), repeat=num_vars)))


def check_log_prob(c, name):
    assert torch.isclose(c.log_prob(_all(c.num_vars, c.num_cats)).exp().sum(), torch.tensor(1.0, dtype=c.dtype))


def check_marginals(c, name):
    xs = _all(c.num_vars, c.num_cats)
    missing = torch.zeros_like(xs, dtype=torch.bool)
    missing[:, -1] = True
    joint = c.log_prob(xs).exp().view(-1, c.num_cats).sum(-1)
    torch.testing.assert_close(c.log_prob(xs, missing=missing).exp()[::c.num_cats], joint)


def check_soft_evidence(c, name):
    xs = _all(c.num_vars, c.num_cats)
    w = torch.randn(1, c.num_vars, c.num_cats, dtype=c.dtype)
    weighted = (c.log_prob(xs) + w[0].gather(1, xs.t()).sum(0)).exp().sum()
    value = c.log_prob(xs[:1], missing=torch.ones(1, c.num_vars, dtype=torch.bool), soft_evidence=w).exp()[0]
    torch.testing.assert_close(value, weighted)


def check_posterior(c, name):
    xs = _all(c.num_vars, c.num_cats)
    p = c.log_prob(xs).exp()
    post = c.posterior(xs[:1], missing=torch.ones(1, c.num_vars, dtype=torch.bool))[0]
    for v in range(c.num_vars):
        torch.testing.assert_close(post[v], torch.stack([p[xs[:, v] == k].sum() for k in range(c.num_cats)]))


def check_sample(c, name):
    x = torch.zeros(500, c.num_vars, dtype=torch.long)
    missing = torch.ones_like(x, dtype=torch.bool)
    missing[:, 0] = False
    s = c.sample(x=x, missing=missing, soft_evidence=torch.randn(500, c.num_vars, c.num_cats, dtype=c.dtype),
                 generator=torch.Generator().manual_seed(0))
    assert (s[:, 0] == 0).all() and torch.isfinite(c.log_prob(s)).all()


def check_mpe(c, name):
    xs = _all(c.num_vars, c.num_cats)
    best = c.mpe(xs[:1], missing=torch.ones(1, c.num_vars, dtype=torch.bool))
    # A decoded assignment is possible; exactness against Viterbi and brute force is proved in
    # tests/test_hmm_reference.py and tests/test_queries.py.
    assert torch.isfinite(c.log_prob(best)).all()


def check_em(c, name):
    data = _data(c.num_vars, c.num_cats)
    before = c.log_prob(data).mean()
    em = FullBatchEM(c)
    em.accumulate(data)
    em.step()
    assert c.log_prob(data).mean() >= before - 1e-9


def check_adam(c, name):
    data = _data(c.num_vars, c.num_cats)
    before = c.log_prob(data).mean().item()
    opt = torch.optim.Adam(c.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        (-c.log_prob(data).mean()).backward()
        opt.step()
    assert c.log_prob(data).mean().item() > before


def check_save_load(c, name, tmp_path):
    path = tmp_path / "c.safetensors"
    pc.save(path, c)
    xs = _all(c.num_vars, c.num_cats)
    assert torch.equal(pc.load(path).log_prob(xs), c.log_prob(xs))


CHECKS = {
    "log_prob": check_log_prob, "marginals": check_marginals, "soft evidence": check_soft_evidence,
    "posterior": check_posterior, "sample": check_sample, "MPE": check_mpe, "EM": check_em, "Adam": check_adam,
    "save/load": check_save_load,
}


def _table() -> tuple[list[str], dict[str, list[str]]]:
    section = README.read_text().split("## Capabilities", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    cells = {}
    for row in rows[2:]:
        parts = [c.strip() for c in row.strip("|").split("|")]
        cells[re.sub(r"[`*]", "", parts[0])] = parts[1:]
    return header[1:], cells


def test_table_lists_every_structure_and_query():
    header, cells = _table()
    assert header == list(CHECKS)
    assert set(cells) == set(BUILDERS)


@pytest.mark.parametrize("structure", list(BUILDERS))
def test_every_ticked_cell_runs(structure, tmp_path):
    header, cells = _table()
    for query, cell in zip(header, cells[structure]):
        if not cell.startswith("✓"):
            continue
        circuit = pc.compile(BUILDERS[structure](), dtype=torch.float64)
        check = CHECKS[query]
        if query == "save/load":
            check(circuit, structure, tmp_path)
        else:
            check(circuit, structure)
