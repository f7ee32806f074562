"""Time ``pclayer.testing.check_circuit`` on a correct HMM of 1024 positions and 256 states.

Builds ``pc.structures.hmm(--length, --states, --cats, seed=0)`` (homogeneous, float32),
compiles it, runs ``check_circuit`` with the given options (by default every property, the
default ``num_samples``) ``--repeats`` times and prints the wall and CPU time of each run, the
time of every property in the last run, the threads used and the machine load, so that runs
on a shared machine can be told apart. The goal of issue 17 is a pass in under 10 s on 2 cores.

Measured on the shared 2-core dev box (float32, K = 16, 2 threads, load average 4.4-7.6 from
other jobs, so wall times are 1.5-3x the CPU time a quiet box would need), issue 17's branch
on the pre-refactor engine:

    ============================================  ==========  =========
    properties                                     wall        CPU
    ============================================  ==========  =========
    all but sampling (rows=4)                      36-90 s     60 s
    sampling, num_samples=20 (60 sample rows)      52 s        -
    sampling, num_samples=50 (150 sample rows)     168 s       ~65 s
    everything, num_samples=50                     133 s       -
    ============================================  ==========  =========

The goal (under 10 s) is not met: every query call on this circuit costs 0.3-5 s (the
log-space max-product and autograd paths most), and ``circuit.sample`` costs about 0.4 s of
CPU per row, so the sampling property alone is minutes at the default num_samples=1000.

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_check_circuit.py``
(``--properties normalisation,posterior`` to time a subset, ``--num-samples 100`` to scale
the sampling property, whose cost is that of ``circuit.sample`` on 3 x num_samples rows).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import pclayer as pc
from pclayer.testing import PROPERTIES, check_circuit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="HMM positions (variables)")
    parser.add_argument("--states", type=int, default=256, help="hidden states")
    parser.add_argument("--cats", type=int, default=16, help="categories per variable")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs")
    parser.add_argument("--num-samples", type=int, default=None, help="check_circuit num_samples (default: its default)")
    parser.add_argument("--properties", default=",".join(PROPERTIES), help="comma-separated properties to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"properties": args.properties.split(",")}
    if args.num_samples is not None:
        options["num_samples"] = args.num_samples
    start = time.perf_counter()
    circuit = pc.compile(pc.structures.hmm(args.length, args.states, args.cats, seed=0))
    print(f"HMM T={args.length} H={args.states} K={args.cats}: built and compiled in {time.perf_counter() - start:.2f} s; "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for run in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        report = check_circuit(circuit, **options)
        print(f"run {run + 1}: check_circuit passed in {time.perf_counter() - start:.2f} s wall, "
              f"{time.process_time() - cpu:.2f} s CPU (load average {os.getloadavg()[0]:.2f})")
    print(report.summary())


if __name__ == "__main__":
    main()
