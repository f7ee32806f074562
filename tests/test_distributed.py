"""Data-parallel EM on torch.distributed: two gloo processes on CPU end with the same
parameters as one process on the union of their shards."""

from __future__ import annotations

import datetime
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pclayer as pc
from pclayer.learn import FullBatchEM, MiniBatchEM, fit, shard
from conftest import free_port

WORLD = 2
F64 = torch.float64


def _circuit() -> pc.TensorCircuit:
    return pc.compile(pc.structures.hmm(5, 3, 4, seed=11), dtype=F64)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = pc.compile(pc.structures.hmm(5, 3, 4, seed=12)).sample(96, generator=torch.Generator().manual_seed(3))
    missing = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.2
    return x, missing


def _train(x: torch.Tensor, missing: torch.Tensor, mini_batches: list[torch.Tensor],
           distributed: bool) -> dict[str, torch.Tensor]:
    """Full-batch EM (two batches per epoch), mini-batch EM on the rows ``mini_batches``,
    then ``fit``; returns the parameters."""
    circuit = _circuit()
    em = FullBatchEM(circuit, distributed=distributed)
    for _ in range(3):
        for xb, mb in zip(x.chunk(2), missing.chunk(2)):
            em.accumulate(xb, mb)
        em.step()
    mini = MiniBatchEM(circuit, step_size=0.5, pseudocount=0.1, distributed=distributed)
    for rows in mini_batches:
        mini.step(x[rows], missing[rows])
    fit(circuit, x, missing=missing, epochs=2, batch_size=16, method="em", distributed=distributed, progress=False)
    return {key: value.detach().clone() for key, value in circuit.params.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # a failing rank cannot hang the other for long
    try:
        x, missing = _data()
        own = shard(torch.arange(len(x)), rank, WORLD)
        params = _train(x[own], missing[own], list(torch.arange(len(own)).chunk(3)), distributed=True)
        safetensors.torch.save_file(params, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.barrier()  # both ranks are done with every collective before either tears gloo down
        dist.destroy_process_group()



def test_two_gloo_ranks_match_one_process_on_the_union(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    x, missing = _data()
    # Mini-batch EM's global batch b is the union of every rank's batch b.
    shards = [shard(torch.arange(len(x)), r, WORLD) for r in range(WORLD)]
    mini_batches = [torch.cat([rows.chunk(3)[b] for rows in shards]) for b in range(3)]
    single = _train(x, missing, mini_batches, distributed=False)
    ranks = [safetensors.torch.load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}"
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-9, atol=1e-11)
    assert not torch.equal(single["sum_3x3"], _circuit().params["sum_3x3"])  # training moved the parameters
