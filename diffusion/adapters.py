"""Adapters from how diffusion-LM codebases produce logits to ``x (B, L) -> logits (B, L, V)``
aligned with positions, plus a Dream-style logits hook."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion.layer import CoDDLayer
from diffusion.windows import apply_in_windows, first_masked_starts

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _check(name: str, logits: object, x: torch.Tensor, extra: int = 0) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 3 or logits.shape[:2] != x.shape:
        raise ValueError(f"{name}: expected float logits of shape ({x.shape[0]}, {x.shape[1]}, V{' + 1' if extra else ''}), "
                         f"got {getattr(logits, 'shape', type(logits).__name__)}")
    return logits


def callable_logits(fn: LogitsFn) -> LogitsFn:
    """Any callable ``x -> logits (B, L, V)`` already aligned with positions, with its output checked."""
    return lambda x: _check("fn", fn(x), x)


def llada_logits(model: Callable) -> LogitsFn:
    """LLaDA-style models: ``model(x).logits`` is aligned with positions."""
    return lambda x: _check("model(x).logits", model(x).logits, x)


def shift_right(logits: torch.Tensor) -> torch.Tensor:
    """Dream's alignment: position ``i`` is predicted at output ``i - 1``, so shift right by
    one (the first position keeps its own output): ``cat([l[:, :1], l[:, :-1]], 1)``."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def dream_logits(model: Callable) -> LogitsFn:
    """Dream-style models: ``model(x).logits`` shifted right by one (see :func:`shift_right`)."""
    return lambda x: shift_right(_check("model(x).logits", model(x).logits, x))


def mdlm_logits(fn: LogitsFn, mask_index: int) -> LogitsFn:
    """MDLM-style models: ``fn(x)`` gives (B, L, V + 1) log-probabilities whose last column
    is the mask token ``mask_index = V`` ("SUBS" puts ``-inf`` there). The column is
    dropped, so token ids are unchanged and the mask id lies outside the returned
    vocabulary (``CoDDLayer`` accepts ``mask_id = V``)."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = _check("fn(x)", fn(x), x, extra=1)
        if mask_index != out.shape[-1] - 1:
            raise ValueError(f"mask_index: expected the last column {out.shape[-1] - 1} (MDLM's mask index V), got {mask_index}")
        return out[..., :mask_index]

    return logits


def dream_logits_hook(layer: CoDDLayer, generator: torch.Generator | None = None) -> Callable:
    """A ``generation_logits_hook_func(step, x, logits) -> logits`` for Dream's own sampler
    (called after Dream's shift). Applies ``layer`` on each row's window starting at its
    first masked position (clamped to the sequence end; a sequence shorter than the window
    uses a partial window)."""

    def hook(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        width = min(layer.window, x.shape[1])
        starts = first_masked_starts(x, layer.mask_id, width)
        return apply_in_windows(layer, logits, x, starts, width, generator)

    return hook
