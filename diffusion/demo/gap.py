"""The misspecification-gap experiment: perplexity per masked token of one window under three denoisers.

For each test sequence (a clean prefix of ``P`` characters, then a window of ``W``) and mask ratio ``r``,
``k = max(1, round(r W))`` window positions are masked uniformly at random, and the clean window is scored by

(a) **one-step factorized**: ``sum_{i in M} log p_theta(x^i | x_t)`` from one backbone call;
(b) **sequential**: the chain rule in a random order, one masked token revealed per backbone call,
    ``sum_k log p_theta(x^{i_k} | x_t, x^{i_1..i_{k-1}})``;
(c) **CoDD**: the exact ``log p_hat(x^M | x_t)`` of the product of the circuit and the backbone marginals.

Perplexities pool all masked tokens: ``exp(sum NLL / sum k)``. The fraction of the gap closed is
``(a - c) / (a - b)`` on perplexities. Confidence intervals resample windows (percentile bootstrap).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffusion.demo.backbone import MaskedDiffusionTransformer


@dataclass
class GapScores:
    """Per-window summed NLL (nats) of the masked tokens, (N,) float64 each, and ``k`` masked per window."""

    ratio: float
    masked_per_window: int
    one_step: torch.Tensor
    sequential: torch.Tensor
    codd: torch.Tensor


def evaluation_windows(tokens: torch.Tensor, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """(count, seq_len) crops of ``tokens`` at evenly spaced starts, shuffled with ``seed`` (deterministic)."""
    last = tokens.numel() - seq_len
    if last < 0:
        raise ValueError(f"tokens: expected at least {seq_len} tokens, got {tokens.numel()}")
    starts = torch.linspace(0, last, count).round().long()
    starts = starts[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]
    return tokens[starts[:, None] + torch.arange(seq_len)]


@torch.no_grad()
def score_batch(model: MaskedDiffusionTransformer, layer, x_0: torch.Tensor, window: int, ratio: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score one batch of sequences (B, P + W) at one mask ratio: returns (one_step, sequential, codd) NLL (B,)."""
    batch, length = x_0.shape
    prefix = length - window
    k = max(1, round(ratio * window))
    order = torch.rand(batch, window, generator=generator).argsort(dim=1)[:, :k] + prefix  # (B, k) reveal order
    rows = torch.arange(batch)[:, None]
    x_t = x_0.clone()
    x_t[rows, order] = model.mask_id
    logits = model(x_t)
    log_probs = logits.log_softmax(-1)
    truth = log_probs.gather(-1, x_0[..., None])[..., 0]  # (B, L)
    one_step = -truth[rows, order].sum(1)
    codd = -layer.log_prob(x_0[:, prefix:], logits[:, prefix:], x_t[:, prefix:])
    sequential = -truth[torch.arange(batch), order[:, 0]]
    current = x_t.clone()
    for step in range(1, k):
        current[torch.arange(batch), order[:, step - 1]] = x_0[torch.arange(batch), order[:, step - 1]]
        step_log_probs = model(current).log_softmax(-1)
        position = order[:, step]
        sequential = sequential - step_log_probs[torch.arange(batch), position, x_0[torch.arange(batch), position]]
    return one_step.double(), sequential.double(), codd.double()


def timed_batches(windows: torch.Tensor, batch_size: int, seconds: float, desc: str) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``windows`` (N, ...) of ``batch_size`` rows, with a progress bar
    titled ``desc``, until ``seconds`` have passed (always at least one batch)."""
    started = time.perf_counter()
    batches = math.ceil(windows.shape[0] / batch_size)
    for index in tqdm(range(batches), desc=desc, unit="batch", leave=False):
        if index > 0 and time.perf_counter() - started >= seconds:
            return
        yield windows[index * batch_size:(index + 1) * batch_size]


def run_gap(model: MaskedDiffusionTransformer, layer, windows: torch.Tensor, *, window: int,
            ratios: tuple[float, ...], batch_size: int, seconds: float, seed: int) -> list[GapScores]:
    """Score batches of ``windows`` (N, P + W) at every ratio until ``seconds`` have passed (at least one batch).

    Returns one :class:`GapScores` per ratio over the windows scored.
    """
    generator = torch.Generator().manual_seed(seed)
    parts: dict[float, list[tuple[torch.Tensor, ...]]] = {r: [] for r in ratios}
    for x_0 in timed_batches(windows, batch_size, seconds, "gap table (one-step / sequential / CoDD)"):
        for ratio in ratios:
            parts[ratio].append(score_batch(model, layer, x_0, window, ratio, generator))
    return [GapScores(ratio=r, masked_per_window=max(1, round(r * window)),
                      one_step=torch.cat([p[0] for p in parts[r]]), sequential=torch.cat([p[1] for p in parts[r]]),
                      codd=torch.cat([p[2] for p in parts[r]])) for r in ratios]


def _summary(one: torch.Tensor, seq: torch.Tensor, codd: torch.Tensor, k: int) -> torch.Tensor:
    """(..., 4): perplexities (a, b, c) and the gap fraction closed (NaN when a == b, e.g. one masked token),
    from summed NLLs over the last axis."""
    a, b, c = (torch.exp(x.sum(-1) / (k * x.shape[-1])) for x in (one, seq, codd))
    gap = a - b
    closed = torch.where(gap != 0, (a - c) / torch.where(gap != 0, gap, torch.ones_like(gap)), torch.nan)
    return torch.stack([a, b, c, closed], dim=-1)


def summarise(scores: GapScores, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Perplexities of (a) one-step, (b) sequential, (c) CoDD, the fraction of the gap closed, and percentile
    bootstrap intervals over windows (``resamples`` draws)."""
    n = scores.one_step.numel()
    point = _summary(scores.one_step, scores.sequential, scores.codd, scores.masked_per_window)
    index = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    boot = _summary(scores.one_step[index], scores.sequential[index], scores.codd[index], scores.masked_per_window)
    low, high = (torch.nanquantile(boot, q, dim=0) for q in ((1 - level) / 2, (1 + level) / 2))
    names = ("one_step", "sequential", "codd", "gap_closed")
    return {"mask_ratio": scores.ratio, "masked_per_window": scores.masked_per_window, "windows": n,
            **{name: {"value": float(point[i]), "ci": [float(low[i]), float(high[i])]} for i, name in enumerate(names)}}
