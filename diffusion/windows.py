"""Where the CoDD layer is applied inside a sequence: per-row windows of ``W`` positions."""

from __future__ import annotations

import torch


def covering_starts(selected: torch.Tensor, lo: int, hi: int, window: int) -> torch.Tensor:
    """(B,) start of the ``window``-long span inside ``[lo, hi)`` covering the most selected
    positions of each row (the first best span; ``lo`` when ``hi - lo <= window``).

    Args:
        selected: (B, L) bool, positions to be decoded this step.
    """
    if hi - lo <= window:
        return torch.full((selected.shape[0],), lo, dtype=torch.long, device=selected.device)
    counts = torch.nn.functional.pad(selected[:, lo:hi].long().cumsum(1), (1, 0))
    coverage = counts[:, window:] - counts[:, :-window]  # (B, hi - lo - window + 1)
    return lo + coverage.argmax(dim=1)


def first_masked_starts(x: torch.Tensor, mask_id: int, window: int) -> torch.Tensor:
    """(B,) window start at each row's first masked position, clamped so the window fits
    (0 for rows without masked positions or sequences shorter than the window)."""
    masked = x == mask_id
    first = torch.where(masked.any(1), masked.long().argmax(1), torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
    return first.clamp(max=max(x.shape[1] - window, 0))


def apply_in_windows(layer, logits: torch.Tensor, x: torch.Tensor, starts: torch.Tensor, width: int,
                     generator: torch.Generator | None = None, gate: float | None = None) -> torch.Tensor:
    """Run ``layer`` on the span ``[starts[b], starts[b] + width)`` of every row.

    Args:
        layer: a :class:`diffusion.CoDDLayer`; ``width <= layer.window``.
        logits: (B, L, V); x: (B, L); starts: (B,) long.

    Returns:
        (B, L, V) logits with each row's span replaced by the layer's output.
    """
    index = starts[:, None] + torch.arange(width, device=x.device)[None]  # (B, width)
    vocab = logits.shape[-1]
    gather = index.unsqueeze(-1).expand(-1, -1, vocab)
    window_logits = layer(logits.gather(1, gather), x.gather(1, index), generator=generator, gate=gate)
    return logits.scatter(1, gather, window_logits)
