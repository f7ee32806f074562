"""Semi-autoregressive block generation (LLaDA-style) with an optional CoDD layer."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from diffusion.layer import CoDDLayer
from diffusion.sampling import REMASKING, confidence, gumbel_argmax, top_positions, transfer_counts
from diffusion.windows import apply_in_windows, apply_to_block, block_couples, covering_starts, window_tokens

LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
LLADA_EOS_ID = 126081
LLADA_EOT_ID = 126348


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _model_logits(model: Callable, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``model(x)``, or ``model(x, attention_mask=...)`` when a mask is given, checked."""
    logits = model(x) if attention_mask is None else model(x, attention_mask=attention_mask)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 3 or logits.shape[:2] != x.shape:
        raise ValueError(
            f"model: expected a float tensor of logits (B, L, V) = ({x.shape[0]}, {x.shape[1]}, V) for input x of shape "
            f"{tuple(x.shape)}, got {getattr(logits, 'shape', type(logits).__name__)}; wrap models with diffusion.adapters"
        )
    return logits


def _guided_logits(model: Callable, x: torch.Tensor, attention_mask: torch.Tensor | None, prompt_length: int,
                   mask_id: int, cfg_scale: float) -> torch.Tensor:
    """LLaDA's unsupervised classifier-free guidance: with ``u`` the logits of ``x`` whose
    prompt is fully masked, ``u + (cfg_scale + 1) * (logits - u)`` (one batched call)."""
    if cfg_scale == 0:
        return _model_logits(model, x, attention_mask)
    unconditional = x.clone()
    unconditional[:, :prompt_length] = mask_id
    both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    both = _model_logits(model, torch.cat([x, unconditional]), both_mask)
    conditional, plain = both.chunk(2)
    return plain + (cfg_scale + 1) * (conditional - plain)


def _check_attention_mask(attention_mask: object, prompt: torch.Tensor) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(prompt.shape) \
            or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"attention_mask: expected a (B, P) = {tuple(prompt.shape)} tensor of 0/1 (1 at real prompt "
                         f"tokens, 0 at padding), got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    return attention_mask


def _check_token_id(name: str, value: object, vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ValueError(f"{name}: expected a token id in [0, {vocab}) (the model's vocabulary), got {value!r}")
    return value


@torch.no_grad()
def generate(model: Callable, prompt: torch.Tensor, *, gen_length: int, block_length: int, steps: int,
             remasking: str = "low_confidence", temperature: float = 0.0, layer: CoDDLayer | None = None,
             gate: float | None = None, mask_id: int | None = None, attention_mask: torch.Tensor | None = None,
             cfg_scale: float = 0.0, logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
             eos_id: int = LLADA_EOS_ID, eot_id: int = LLADA_EOT_ID, logits_hook: LogitsHook | None = None,
             generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Fill ``gen_length`` masked positions after ``prompt`` block by block (LLaDA's loop).

    Each of the ``gen_length // block_length`` blocks gets ``steps // num_blocks`` steps. Per
    step: ``logits = model(x)`` (``model(x, attention_mask=...)`` with a mask; LLaDA's
    classifier-free guidance with ``cfg_scale > 0``); ``logits_hook(step, x, logits)`` if
    given; the mask id (when ``mask_id < V``) and, with ``logits_eos_inf``, EOS get ``-inf``;
    the CoDD ``layer`` on the active block if given; tokens ``argmax(logits / T + Gumbel)``
    (float64); the remasking rule scores the masked positions of the block and the top
    ``k`` (LLaDA's even schedule) are committed. The mask id is never committed.

    Windows: when ``block_length <= layer.window`` the layer covers the whole block (block
    diffusion; a shorter block sums out the circuit's missing positions). Otherwise (full
    diffusion, e.g. ``block_length = gen_length``) the layer covers, per row, the
    ``layer.window``-long span of the block holding the most positions chosen with the
    plain logits; tokens and confidences are then recomputed from the modified logits and
    the top ``k`` are committed (unlike Dream's code, chosen positions outside the span
    are not forced). To couple every window of a long block instead, call
    :func:`diffusion.apply_to_block` from a ``logits_hook``.

    Gate: a window is coupled only while its mask ratio is below the gate (see
    :class:`CoDDLayer`); the first step of a block is fully masked, so with one step per
    block a gate ``<= 1`` never couples. A ``UserWarning`` says so when the gate disabled the
    layer on every step of the call.

    Args:
        model: ``x (B, L) -> logits (B, L, V)`` aligned with positions (see ``diffusion.adapters``);
            with ``attention_mask`` it is called as ``model(x, attention_mask=mask)``.
        prompt: (B, P) long prompt tokens (left-padded for batches of different lengths).
        gen_length, block_length, steps: positive ints; ``gen_length % block_length == 0``
            and ``steps`` a multiple of the number of blocks.
        remasking: one of ``low_confidence``, ``random``, ``margin``, ``entropy``, ``topprob``.
        temperature: Gumbel temperature T >= 0 (0 = greedy).
        layer: optional :class:`CoDDLayer`; its ``mask_id`` must equal ``mask_id`` if both are given.
        gate: overrides ``layer.gate``.
        mask_id: the mask token (required without a layer).
        attention_mask: optional (B, P) 0/1 tensor, 0 at padding; extended with ones over the
            generated positions (as LLaDA and Dream do) and passed to the model.
        cfg_scale: LLaDA's unsupervised classifier-free guidance scale (0 = off): the logits
            become ``u + (cfg_scale + 1) * (logits - u)`` with ``u`` the logits of ``x`` whose
            prompt positions are all masked.
        logits_eos_inf: LLaDA's option: EOS (``eos_id``) is never chosen (its logit is ``-inf``).
        confidence_eos_eot_inf: LLaDA's option: the remasking confidence is computed from the
            logits with EOS and EOT (``eot_id``) at ``-inf``, so positions that chose them have
            confidence 0 (``low_confidence``) and are committed last. (LLaDA's code writes the
            EOS entry into a tensor it no longer reads, so there only EOT takes effect.)
        eos_id, eot_id: LLaDA's ``<|endoftext|>`` and ``<|eot_id|>`` ids by default.
        logits_hook: ``(step, x, logits) -> logits`` called before the layer.
        generator: torch generator for Gumbel noise, random remasking and the layer.
        progress: show a tqdm bar over steps.

    Returns:
        (B, P + gen_length) long tokens (B may be 0).
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
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not 0 <= cfg_scale < float("inf"):
        raise ValueError(f"cfg_scale: expected a finite number >= 0, got {cfg_scale!r}")
    if mask_id is None:
        if layer is None:
            raise ValueError("mask_id: required when no layer is given")
        mask_id = layer.mask_id
    elif layer is not None and mask_id != layer.mask_id:
        raise ValueError(f"mask_id: {mask_id} differs from layer.mask_id {layer.mask_id}; the layer would see no masked "
                         "position and do nothing. Pass the same id (or omit mask_id to use the layer's)")
    if not isinstance(prompt, torch.Tensor) or prompt.ndim != 2 or prompt.is_floating_point() or prompt.dtype == torch.bool:
        raise ValueError(f"prompt: expected a (B, P) integer tensor, got {getattr(prompt, 'shape', type(prompt).__name__)}")
    if bool((prompt == mask_id).any()):
        raise ValueError(f"prompt: contains the mask id {mask_id}")
    attention_mask = _check_attention_mask(attention_mask, prompt)
    steps_per_block = steps // num_blocks
    batch, prompt_length = prompt.shape
    x = torch.cat([prompt.long(), torch.full((batch, gen_length), mask_id, dtype=torch.long, device=prompt.device)], 1)
    if batch == 0:
        return x
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], 1)
    bar = tqdm(total=steps, desc="generate", disable=not progress)
    step, coupled = 0, False
    for block in range(num_blocks):
        lo = prompt_length + block * block_length
        hi = lo + block_length
        counts = transfer_counts(x[:, lo:hi] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            masked = x == mask_id
            in_block = torch.zeros_like(masked)
            in_block[:, lo:hi] = True
            candidates = masked & in_block
            logits = _guided_logits(model, x, attention_mask, prompt_length, mask_id, cfg_scale)
            if logits_hook is not None:
                logits = logits_hook(step, x, logits)
            vocab = logits.shape[-1]
            banned = [mask_id] if mask_id < vocab else []
            if logits_eos_inf:
                banned.append(_check_token_id("eos_id", eos_id, vocab))
            if banned:
                logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), -torch.inf)
            last = [_check_token_id("eos_id", eos_id, vocab), _check_token_id("eot_id", eot_id, vocab)] \
                if confidence_eos_eot_inf else []

            def choose(current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                tokens = gumbel_argmax(current, float(temperature), generator)
                scored = current.index_fill(-1, torch.tensor(last, device=current.device), -torch.inf) if last else current
                score = confidence(scored, tokens, remasking, generator)
                score = torch.where(candidates, score, torch.full_like(score, -torch.inf))
                return tokens, top_positions(score, counts[:, i]) & candidates

            if layer is not None:
                if block_length <= layer.window:
                    coupled |= block_couples(layer, x, lo, hi, gate)
                    logits = apply_to_block(layer, logits, x, lo, hi, generator, gate)
                else:
                    _, chosen = choose(logits)
                    starts = covering_starts(chosen, lo, hi, layer.window)
                    coupled |= bool(layer.gated_rows(window_tokens(x, starts, layer.window), gate).any())
                    logits = apply_in_windows(layer, logits, x, starts, layer.window, generator, gate)
            tokens, commit = choose(logits)
            x = torch.where(commit, tokens, x)
            step += 1
            bar.update(1)
    bar.close()
    if layer is not None and not coupled:
        warnings.warn(f"generate: the gate ({layer.gate if gate is None else gate}) disabled the CoDD layer on every "
                      "step, so the output is plain decoding. A window is coupled only while its mask ratio is below "
                      "the gate, and the first step of a block is fully masked (ratio 1); use more steps per block or "
                      "gate > 1 (e.g. float('inf')) to couple every step", UserWarning, stacklevel=3)
    return x
