"""The GPU check runs end to end without a GPU (``--device cpu``): every query, CoDD mode and
EM step on every available route agrees with the float64 reference, and the CUDA route is
reported unavailable with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--repeats", "1",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert (tmp_path / "gpu_report.md").read_text().startswith("# GPU check on cpu")
    expected = {"log_prob", "flows", "posterior", "sample", "mpe", "EM step",
                "CoDD latent", "CoDD marginal", "CoDD sample", "CoDD any_order"}
    for case in ("hmm", "rat-spn"):
        routes = report["cases"][case]
        for route in ("auto", "torch"):
            assert routes[route]["available"] and set(routes[route]["queries"]) == expected
            assert all(cell["ok"] for cell in routes[route]["queries"].values())
        assert not routes["cuda"]["available"] and "CUDA tensors" in routes["cuda"]["reason"]
