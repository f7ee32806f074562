"""The CoDD scale scripts run end to end at small sizes: the layer benchmark prints every row
(inference, training and their floors), and data-parallel training at scale ends with the
same circuit on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_codd_layer_benchmark_prints_inference_and_training_rows() -> None:
    out = _run("bench_codd_layer.py", "--vocab", "300", "--window", "6", "--states", "8", "--top-k", "5",
               "--repeats", "1", "--train-batch", "2")
    for row in ("latent   full vocabulary", "marginal top-5", "dense (W x V) @ (V x H)",
                "codd_loss forward+backward, B = 2, full vocabulary", "codd_loss forward+backward, B = 2, top-5",
                "training floor, B = 2"):
        assert row in out, f"missing row {row!r} in:\n{out}"


def test_data_parallel_training_at_scale_ends_with_one_circuit() -> None:
    out = _run("train_codd_at_scale.py", "--vocab", "200", "--window", "4", "--states", "6", "--rows", "5",
               "--batch", "4", "--top-k", "7")
    assert "every rank holds the same circuit: True" in out, out
    assert out.count("s per training step") == 2
