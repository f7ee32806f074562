"""Semi-autoregressive block generation (LLaDA-style) with an optional CoDD layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from diffusion.layer import CoDDLayer
from diffusion.sampling import REMASKING, confidence, gumbel_argmax, top_positions, transfer_counts
from diffusion.windows import apply_in_windows, covering_starts

LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _model_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 3 or logits.shape[:2] != x.shape:
        raise ValueError(
            f"model: expected a float tensor of logits (B, L, V) = ({x.shape[0]}, {x.shape[1]}, V) for input x of shape "
            f"{tuple(x.shape)}, got {getattr(logits, 'shape', type(logits).__name__)}; wrap models with diffusion.adapters"
        )
    return logits


@torch.no_grad()
def generate(model: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, *, gen_length: int,
             block_length: int, steps: int, remasking: str = "low_confidence", temperature: float = 0.0,
             layer: CoDDLayer | None = None, gate: float | None = None, mask_id: int | None = None,
             logits_hook: LogitsHook | None = None, generator: torch.Generator | None = None,
             progress: bool = False) -> torch.Tensor:
    """Fill ``gen_length`` masked positions after ``prompt`` block by block (LLaDA's loop).

    Each of the ``gen_length // block_length`` blocks gets ``steps // num_blocks`` steps. Per
    step: ``logits = model(x)``; ``logits_hook(step, x, logits)`` if given; the CoDD
    ``layer`` on the active block if given; tokens ``argmax(logits / T + Gumbel)`` (float64);
    the remasking rule scores the masked positions of the block and the top
    ``k`` (LLaDA's even schedule) are committed.

    Windows: when ``block_length <= layer.window`` the layer covers the whole block (block
    diffusion; a shorter block sums out the circuit's missing positions). Otherwise (full
    diffusion, e.g. ``block_length = gen_length``) the layer covers, per row, the
    ``layer.window``-long span of the block holding the most positions chosen with the
    plain logits; tokens and confidences are then recomputed from the modified logits and
    the top ``k`` are committed (unlike Dream's code, chosen positions outside the span
    are not forced).

    Args:
        model: ``x (B, L) -> logits (B, L, V)`` aligned with positions (see ``diffusion.adapters``).
        prompt: (B, P) long prompt tokens.
        gen_length, block_length, steps: positive ints; ``gen_length % block_length == 0``
            and ``steps`` a multiple of the number of blocks.
        remasking: one of ``low_confidence``, ``random``, ``margin``, ``entropy``, ``topprob``.
        temperature: Gumbel temperature T >= 0 (0 = greedy).
        layer: optional :class:`CoDDLayer` (its ``mask_id`` is used when ``mask_id`` is None).
        gate: overrides ``layer.gate``.
        mask_id: the mask token (required without a layer).
        logits_hook: ``(step, x, logits) -> logits`` called before the layer.
        generator: torch generator for Gumbel noise, random remasking and the layer.
        progress: show a tqdm bar over steps.

    Returns:
        (B, P + gen_length) long tokens.
    """
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        _positive_int(name, value)
    if gen_length % block_length:
        raise ValueError(f"block_length: expected a divisor of gen_length {gen_length}, got {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps: expected a multiple of the number of blocks {num_blocks}, got {steps}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if mask_id is None:
        if layer is None:
            raise ValueError("mask_id: required when no layer is given")
        mask_id = layer.mask_id
    if not isinstance(prompt, torch.Tensor) or prompt.ndim != 2 or prompt.is_floating_point() or prompt.dtype == torch.bool:
        raise ValueError(f"prompt: expected a (B, P) integer tensor, got {getattr(prompt, 'shape', type(prompt).__name__)}")
    if bool((prompt == mask_id).any()):
        raise ValueError(f"prompt: contains the mask id {mask_id}")
    steps_per_block = steps // num_blocks
    batch, prompt_length = prompt.shape
    x = torch.cat([prompt.long(), torch.full((batch, gen_length), mask_id, dtype=torch.long, device=prompt.device)], 1)
    bar = tqdm(total=steps, desc="generate", disable=not progress)
    step = 0
    for block in range(num_blocks):
        lo = prompt_length + block * block_length
        hi = lo + block_length
        counts = transfer_counts(x[:, lo:hi] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            masked = x == mask_id
            in_block = torch.zeros_like(masked)
            in_block[:, lo:hi] = True
            candidates = masked & in_block
            logits = _model_logits(model, x)
            if logits_hook is not None:
                logits = logits_hook(step, x, logits)

            def choose(current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                tokens = gumbel_argmax(current, float(temperature), generator)
                score = confidence(current, tokens, remasking, generator)
                score = torch.where(candidates, score, torch.full_like(score, -torch.inf))
                return tokens, top_positions(score, counts[:, i]) & candidates

            if layer is not None:
                if block_length <= layer.window:
                    starts = torch.full((batch,), lo, dtype=torch.long, device=x.device)
                    logits = apply_in_windows(layer, logits, x, starts, block_length, generator, gate)
                else:
                    _, chosen = choose(logits)
                    starts = covering_starts(chosen, lo, hi, layer.window)
                    logits = apply_in_windows(layer, logits, x, starts, layer.window, generator, gate)
            tokens, commit = choose(logits)
            x = torch.where(commit, tokens, x)
            step += 1
            bar.update(1)
    bar.close()
    return x
