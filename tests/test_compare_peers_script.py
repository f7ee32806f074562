"""The peer comparison script (benchmarks/compare_peers.py): its SparC adapter computes the same
HMM log-likelihoods as pclayer, and a missing peer is skipped with a note.

SparC lives in the peers venv, whose pytest lacks hypothesis (tests/conftest.py needs it); run
the SparC test there with ``peers-venv/bin/python -m pytest --noconftest tests/test_compare_peers_script.py`` (see docs/performance.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import pclayer as pc

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_peers.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sparc_hmm_matches_pclayer_and_its_tasks_run() -> None:
    pytest.importorskip("sparc")
    script = _load_script()
    sizes = script.Sizes(num_vars=5, num_states=4, num_cats=6, batch=32)
    tables = script._random_tables(sizes, seed=3)
    x = torch.randint(0, sizes.num_cats, (sizes.batch, sizes.num_vars), generator=torch.Generator().manual_seed(4))

    (runner,) = script.sparc_runners(sizes, x, tables, ["hmm"])
    circuit = pc.compile(pc.structures.hmm(sizes.num_vars, sizes.num_states, sizes.num_cats, homogeneous=False,
                                           initial=tables[0], transition=tables[1], emission=tables[2]),
                         dtype=torch.float64)
    expected = circuit.log_prob(x).detach()
    assert torch.allclose(runner.log_likelihood(), expected, rtol=0, atol=1e-10)

    t, h, k = sizes.num_vars, sizes.num_states, sizes.num_cats
    assert runner.num_params == t * h * k + (t - 1) * h * h + h
    before = runner.log_likelihood().mean().item()
    runner.tasks["forward+backward"]()
    runner.tasks["EM step"]()  # one projected-gradient ascent step on this batch
    assert runner.log_likelihood().mean().item() > before


@pytest.mark.slow
def test_report_has_a_sparc_row_or_a_skip_note(tmp_path: Path) -> None:
    script = _load_script()
    script.main(["--threads", "1", "--repeats", "1", "--structures", "hmm", "--libraries", "pclayer,sparc",
                 "--vars", "4", "--states", "3", "--cats", "5", "--batch", "16", "--out", str(tmp_path)])
    report = (tmp_path / "peers.md").read_text()
    assert "| hmm | pclayer |" in report
    if script._version("sparc-pc") is None:
        assert "sparc: not installed (pip install sparc-pc); skipped" in report
    else:
        assert "| hmm | sparc |" in report
        agreement = next(line for line in report.splitlines() if "pclayer vs sparc" in line)
        assert float(agreement.split("= ")[1].split()[0]) < 1e-4
