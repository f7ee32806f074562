"""Training with top-k evidence keeps memory proportional to the parameters plus B*W*k: the
gradient of the tied emission table is one table-sized accumulation, never one dense copy per
position (regression: a (B, W, H, V) gradient made the paper's configuration ask for 33 GB).

Each size runs in its own process, so the peak resident memory is that configuration's alone;
the test compares how the peak grows between two vocabulary sizes (the scaling), not a
machine-dependent absolute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import resource, sys, torch
import pclayer as pc
from diffusion import CoDDLayer, codd_loss
from diffusion.evidence import SparseLogits
torch.set_num_threads(1)
vocab, states, width, batch, k = int(sys.argv[1]), 128, 16, 2, 16
circuit = pc.compile(pc.structures.hmm(width, states, vocab, seed=0))
layer = CoDDLayer(circuit, mask_id=vocab, temperature=1.0)
gen = torch.Generator().manual_seed(0)
x_0 = torch.randint(0, vocab, (batch, width), generator=gen)
x_t = torch.where(torch.rand(batch, width, generator=gen) < 0.5, torch.full_like(x_0, vocab), x_0)
top = torch.randn(batch, width, vocab, generator=gen).topk(k, -1)
indices = torch.where(torch.arange(k) == 0, x_0.unsqueeze(-1), top.indices)  # the target among the candidates
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
codd_loss(layer, x_0, SparseLogits(top.values, indices), x_t).backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _peak_growth_kb(vocab: int) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(vocab)], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_top_k_backward_memory_grows_with_the_table_not_with_positions():
    small, large = 8_192, 65_536
    growth = (_peak_growth_kb(large) - _peak_growth_kb(small)) * 1024
    table_bytes = 128 * (large - small) * 4  # one float32 emission table's growth
    positions_bytes = 2 * 16 * table_bytes   # what one dense copy per (row, position) would need
    assert growth < 8 * table_bytes < positions_bytes, (growth, table_bytes)
