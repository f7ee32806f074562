"""Data-parallel train_codd on torch.distributed: two gloo processes end with the circuit of
one process training on the whole data (issue 12, point 9)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pclayer as pc
from diffusion import CoDDLayer, train_codd
from conftest import free_port

WORLD, VOCAB, MASK = 2, 4, 4
# 21 rows in batches of 5: the last batch has one row, so rank 1 has none of it.
SETTINGS = {"plain": {"batch_size": 5}, "cached": {"batch_size": 5, "cache_logits": True, "top_k": 3}}


def _layer() -> CoDDLayer:
    return CoDDLayer(pc.compile(pc.structures.hmm(3, 3, VOCAB, seed=4), dtype=torch.float64), mask_id=MASK)


def _data() -> torch.Tensor:
    a = torch.randint(0, VOCAB, (21, 3), generator=torch.Generator().manual_seed(5))
    return a.repeat_interleave(2, dim=1)  # (21, 6): two windows of 3


def _backbone(x_t: torch.Tensor) -> torch.Tensor:
    """A frozen factorised backbone that reads the visible tokens (row by row)."""
    table = torch.linspace(-1, 1, (VOCAB + 1) * VOCAB).view(VOCAB + 1, VOCAB)
    return table[x_t] + 0.3 * table[x_t.roll(1, dims=1)]


def _train(distributed: bool, setting: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    layer = _layer()
    history = train_codd(layer, _backbone, _data(), epochs=3, lr=0.1, seed=7, distributed=distributed, progress=False,
                         **SETTINGS[setting])
    return {k: v.detach().clone() for k, v in layer.circuit.params.items()}, history["step_loss"]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # a failing rank cannot hang the other for long
    try:
        for setting in SETTINGS:
            params, losses = _train(True, setting)
            params["losses"] = torch.tensor(losses, dtype=torch.float64)
            safetensors.torch.save_file(params, str(Path(out_dir) / f"{setting}{rank}.safetensors"))
        other = _data() if rank == 0 else _data().flip(0)
        try:
            train_codd(_layer(), _backbone, other, epochs=1, distributed=True, progress=False)
        except ValueError as error:
            (Path(out_dir) / f"refused{rank}").write_text(str(error))
    finally:
        dist.barrier()  # both ranks are done with every collective before either tears gloo down
        dist.destroy_process_group()



def test_two_gloo_ranks_match_one_process_on_the_whole_data(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for setting in SETTINGS:
        single, losses = _train(False, setting)
        ranks = [safetensors.torch.load_file(str(tmp_path / f"{setting}{r}.safetensors")) for r in range(WORLD)]
        for key, value in single.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{setting}: ranks disagree on {key}"
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ranks[0]["losses"], torch.tensor(losses, dtype=torch.float64), rtol=1e-9, atol=1e-12)
        assert not torch.equal(single["sum_3x3"], _layer().circuit.params["sum_3x3"])  # training moved the circuit
    for rank in range(WORLD):
        assert "data: differs between ranks" in (tmp_path / f"refused{rank}").read_text()


def test_distributed_needs_an_initialised_process_group():
    with pytest.raises(ValueError, match="distributed: torch.distributed is not initialised"):
        train_codd(_layer(), _backbone, _data(), distributed=True, progress=False)
