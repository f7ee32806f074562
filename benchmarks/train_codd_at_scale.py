"""Data-parallel CoDD training at the paper's size on CPU processes (gloo): a check of the recipe.

The paper's layer: LLaDA's vocabulary (V = 126,464), a homogeneous HMM of H = 1024 states over
windows of W = 32. ``--ranks`` processes run ``train_codd(distributed=True, cache_logits=True,
top_k=...)`` on the same synthetic data (sequences of two windows) with a stand-in backbone
(seeded random logits); every step all-reduces the circuit's gradients once. Reports the
seconds per step, each rank's peak resident memory, and whether every rank ends with the same
circuit. No GPU runs here: on GPUs the same script runs with ``--backend nccl`` and CUDA tensors
(untested).

Run: ``python benchmarks/train_codd_at_scale.py [--ranks 2] [--rows 8] [--batch 4]``
(about 6 GB of memory per rank).
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pclayer as pc
from diffusion import CoDDLayer, train_codd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RandomBackbone:
    """A frozen stand-in backbone: (B, L) tokens -> (B, L, V) logits, the same on every rank
    for the same tokens (seeded by the tokens)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, x_t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*x_t.shape, self.vocab)
        for b in range(x_t.shape[0]):
            generator = torch.Generator().manual_seed(int(x_t[b].sum()) * 7919 + x_t.shape[1])
            out[b] = torch.randn(x_t.shape[1], self.vocab, generator=generator) * 3
        return out


def _rank_main(rank: int, args: argparse.Namespace, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group(args.backend, rank=rank, world_size=args.ranks, timeout=datetime.timedelta(seconds=600))
    vocab, window, states = args.vocab, args.window, args.states
    circuit = pc.compile(pc.structures.hmm(window, states, vocab, seed=0), dtype=torch.float32)
    layer = CoDDLayer(circuit, mask_id=vocab)
    data = torch.randint(0, vocab, (args.rows, 2 * window), generator=torch.Generator().manual_seed(1))
    began = time.perf_counter()
    history = train_codd(layer, RandomBackbone(vocab), data, epochs=1, batch_size=args.batch, lr=1e-2,
                         cache_logits=True, top_k=args.top_k, distributed=True, progress=rank == 0)
    seconds = time.perf_counter() - began
    checksum = torch.stack([p.detach().double().sum() for p in circuit.parameters()])
    gathered = [torch.zeros_like(checksum) for _ in range(args.ranks)]
    dist.all_gather(gathered, checksum)
    results[rank] = {"steps": len(history["step_loss"]), "train_seconds": history["seconds"], "total_seconds": seconds,
                     "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                     "same_circuit": all(torch.equal(g, gathered[0]) for g in gathered),
                     "loss": history["step_loss"]}
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8, help="training sequences (two windows each)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step, split over the ranks")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=126_464)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--states", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(args, _free_port(), results), nprocs=args.ranks, join=True)
        results = dict(results)
    steps = results[0]["steps"]
    print(f"V = {args.vocab}, H = {args.states}, W = {args.window}, top-{args.top_k}, {args.ranks} {args.backend} ranks "
          f"x {args.threads} threads, {args.rows} sequences of {2 * args.window} tokens, batch {args.batch}: {steps} steps")
    for rank in sorted(results):
        r = results[rank]
        print(f"rank {rank}: {r['train_seconds'] / max(r['steps'], 1):.1f} s per training step (backbone logits "
              f"cached before), {r['total_seconds']:.0f} s in all, peak RSS {r['peak_rss_gb']:.2f} GB, loss per step {[round(v, 3) for v in r['loss']]}")
    print("every rank holds the same circuit:", all(r["same_circuit"] for r in results.values()))


if __name__ == "__main__":
    main()
