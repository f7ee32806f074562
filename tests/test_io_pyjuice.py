"""Import of PyJuice ``.jpc`` files.

The fixtures were written by PyJuice 2.6.3's own ``pyjuice.save`` (see
``tests/fixtures/make_pyjuice_fixtures.py``); their ``.json`` companions hold
log-likelihoods computed in numpy from PyJuice's in-memory nodes.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import pclayer as pc
from pclayer.io import CircuitFileError, UnsafePickleError, load_pyjuice

FIXTURES = Path(__file__).parent / "fixtures"


def _reference(name: str) -> dict:
    return json.loads((FIXTURES / f"pyjuice_{name}.json").read_text())


@pytest.mark.parametrize("name", ["hmm", "dag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_likelihoods_match_the_parameters_in_the_file(name, dtype):
    reference = _reference(name)
    assert reference["written_by"].startswith("pyjuice 2.6.3")
    circuit = pc.compile(load_pyjuice(FIXTURES / f"pyjuice_{name}.jpc"), dtype=dtype)
    log_p = circuit.log_prob(torch.tensor(reference["x"])).detach().double()
    tolerance = 1e-6 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(log_p, torch.tensor(reference["log_likelihoods"], dtype=torch.float64),
                               rtol=0, atol=tolerance)


def test_the_generalized_hmm_keeps_its_ties_and_parameters():
    reference = _reference("hmm")
    circuit = pc.compile(load_pyjuice(FIXTURES / "pyjuice_hmm.jpc"), dtype=torch.float64)
    tables = {key: torch.exp(value).detach() for key, value in circuit.log_tables().items()}
    assert sorted(tables) == ["cat_4x3", "sum_1x4", "sum_4x4"]  # one bank each: homogeneous
    torch.testing.assert_close(tables["cat_4x3"][0], torch.tensor(reference["beta"], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(tables["sum_4x4"][0], torch.tensor(reference["alpha"], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(tables["sum_1x4"][0, 0], torch.tensor(reference["gamma"], dtype=torch.float64), atol=1e-6, rtol=0)


def test_extern_product_categorical_leaves_take_the_external_factor_as_soft_evidence():
    """PyJuice's "unnormalized_ll" mode with a value mask, as CoDD uses it."""
    reference = _reference("hmm")
    circuit = pc.compile(load_pyjuice(FIXTURES / "pyjuice_hmm.jpc"), dtype=torch.float64)
    log_p = circuit.log_prob(torch.tensor(reference["x"]), missing=~torch.tensor(reference["value_mask"]),
                             soft_evidence=torch.log(torch.tensor(reference["external_probs"], dtype=torch.float64)))
    torch.testing.assert_close(log_p.detach(), torch.tensor(reference["unnormalized_ll"], dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_the_dag_is_a_normalised_distribution():
    circuit = pc.compile(load_pyjuice(FIXTURES / "pyjuice_dag.jpc"), dtype=torch.float64)
    everything = torch.tensor(list(itertools.product(range(3), range(3), range(2))))
    assert float(torch.logsumexp(circuit.log_prob(everything).detach(), 0)) == pytest.approx(0.0, abs=1e-12)


def _nodes(name: str) -> list[dict]:
    # Our own fixture, whose outer pickle holds only dicts, tuples and numpy arrays.
    return pickle.loads((FIXTURES / f"pyjuice_{name}.jpc").read_bytes())


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.jpc"
    path.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        load_pyjuice(path)
    nodes = _nodes("dag")
    nodes[0]["dist"] = pickle.dumps(_Evil(str(marker)))
    path.write_bytes(pickle.dumps(nodes))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        load_pyjuice(path)
    assert not marker.exists()


def test_malformed_files_give_clear_errors(tmp_path):
    path = tmp_path / "bad.jpc"
    raw = (FIXTURES / "pyjuice_hmm.jpc").read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CircuitFileError, match="not a readable PyJuice file"):
        load_pyjuice(path)
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(CircuitFileError, match="expected a non-empty list of node dicts"):
        load_pyjuice(path)
    nodes = _nodes("dag")
    nodes[-1]["external_params"] = b""
    path.write_bytes(pickle.dumps(nodes))
    with pytest.raises(CircuitFileError, match="external parameters are not supported"):
        load_pyjuice(path)
    nodes = _nodes("dag")
    sum_id = next(i for i, n in enumerate(nodes) if n["type"] == "Sum" and "params" in n)
    nodes[sum_id]["params"] = -np.abs(nodes[sum_id]["params"])
    path.write_bytes(pickle.dumps(nodes))
    with pytest.raises(CircuitFileError, match="non-negative"):
        load_pyjuice(path)
    nodes = _nodes("dag")
    nodes[1]["chs"] = (5,)
    path.write_bytes(pickle.dumps(nodes))
    with pytest.raises(CircuitFileError, match="must be indices of earlier nodes"):
        load_pyjuice(path)
