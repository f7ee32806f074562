"""Time ``log_prob``, ``sample`` and ``mpe`` on one circuit and report their ratios.

The case of the one-engine issue: an HMM of 128 states over 32 variables with 256 categories,
a batch of 512 with half the values missing and soft evidence on every variable. The three
queries are timed in interleaved rounds in one process (so machine load hits them alike) and
the medians are printed with ``sample / log_prob`` and ``mpe / log_prob``.

Run: ``python benchmarks/bench_query_ratios.py [--threads 2] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pclayer as pc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--states", type=int, default=128)
    parser.add_argument("--vars", type=int, default=32)
    parser.add_argument("--cats", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    circuit = pc.compile(pc.structures.hmm(num_vars=args.vars, num_states=args.states, num_cats=args.cats, seed=0))
    x = torch.randint(0, args.cats, (args.batch, args.vars), generator=generator)
    missing = torch.rand(args.batch, args.vars, generator=generator) < 0.5
    evidence = torch.log_softmax(torch.randn(args.batch, args.vars, args.cats, generator=generator), -1)
    queries = {
        "log_prob": lambda: circuit.log_prob(x, missing, evidence),
        "sample": lambda: circuit.sample(x=x, missing=missing, soft_evidence=evidence, generator=generator),
        "mpe": lambda: circuit.mpe(x, missing, evidence),
    }
    times: dict[str, list[float]] = {name: [] for name in queries}
    with torch.no_grad():
        for query in queries.values():  # warm-up: caches and workspaces
            query()
        for _ in range(args.rounds):
            for name, query in queries.items():
                began = time.perf_counter()
                query()
                times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(f"HMM {args.states} states, {args.vars} variables, {args.cats} categories, batch {args.batch}, "
          f"half missing, soft evidence, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| query | time | ratio to log_prob |\n|---|---|---|")
    for name, value in median.items():
        print(f"| `{name}` | {value:.1f} ms | {value / median['log_prob']:.2f} |")


if __name__ == "__main__":
    main()
