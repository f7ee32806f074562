"""Data-parallel EM on ``torch.distributed``: every rank computes flows on its shard,
the flows are summed over ranks (one all-reduce), and every rank applies the same
M-step, so all ranks hold identical parameters.

Launching on one or several machines with ``torchrun``::

    # one machine, 4 processes (CPU: gloo; GPUs: nccl)
    torchrun --standalone --nproc_per_node=4 train.py
    # two machines, 8 processes each; run on both, with the first one's address
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py

where ``train.py`` does::

    import torch.distributed as dist
    import pclayer as pc
    from pclayer.learn import FullBatchEM, shard

    dist.init_process_group("gloo")          # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR
    circuit = pc.compile(root)               # same structure and initial parameters on every rank
    x_local = shard(x, dist.get_rank(), dist.get_world_size())
    em = FullBatchEM(circuit, distributed=True)
    for epoch in range(10):
        for batch in x_local.split(512):
            em.accumulate(batch)
        train_ll = em.step()                 # all-reduce + identical M-step on every rank
    dist.destroy_process_group()

Gradient training (Adam) is ordinary PyTorch data parallelism: wrap the circuit in
``torch.nn.parallel.DistributedDataParallel``.
"""

from __future__ import annotations

import torch

from pclayer.learn.flows import Flows


def all_reduce_flows(flows: Flows, process_group=None) -> Flows:
    """Sum ``flows`` over all ranks of ``process_group`` (default: the world).

    All tensors travel in one flattened float64 buffer (one collective call). Returns a
    new :class:`Flows`; the argument is left unchanged.
    """
    parts = flows.tensors()
    buffer = torch.cat([t.reshape(-1) for t in parts])
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM, group=process_group)
    pieces = iter(buffer.split([t.numel() for t in parts]))
    counts = {k: next(pieces).view_as(flows.counts[k]) for k in sorted(flows.counts)}
    statistics = {k: next(pieces).view_as(flows.statistics[k]) for k in sorted(flows.statistics)}
    log_likelihood = next(pieces).view_as(flows.log_likelihood)
    weight = next(pieces).view_as(flows.weight)
    return Flows(counts, statistics, log_likelihood, weight)


def shard(data: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rows ``rank, rank + world_size, ...`` of ``data`` (B, ...): disjoint shards whose
    union is ``data``."""
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
    return data[rank::world_size]
