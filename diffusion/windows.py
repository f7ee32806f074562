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


def masked_span(x: torch.Tensor, mask_id: int) -> tuple[int, int]:
    """``(start, stop)``: the smallest span ``[start, stop)`` holding every masked position of
    every row of ``x`` (B, L); ``(0, 0)`` when nothing is masked."""
    columns = (x == mask_id).any(dim=0).nonzero().flatten()
    if columns.numel() == 0:
        return 0, 0
    return int(columns[0]), int(columns[-1]) + 1


def block_windows(start: int, stop: int, window: int) -> list[tuple[int, int]]:
    """The consecutive windows ``[start, start + W), [start + W, start + 2W), ...`` covering
    ``[start, stop)``; the last one may be shorter."""
    return [(s, min(s + window, stop)) for s in range(start, stop, window)]


def window_tokens(x: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) tokens of each row's span ``[starts[b], starts[b] + width)``."""
    return x.gather(1, starts[:, None] + torch.arange(width, device=x.device)[None])


def apply_in_windows(layer, logits: torch.Tensor, x: torch.Tensor, starts: torch.Tensor, width: int,
                     generator: torch.Generator | None = None, gate: float | None = None) -> torch.Tensor:
    """Run ``layer`` on the span ``[starts[b], starts[b] + width)`` of every row (a span
    that may start at a different position in each row).

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


def apply_to_block(layer, logits: torch.Tensor, x: torch.Tensor, start: int, stop: int,
                   generator: torch.Generator | None = None, gate: float | None = None,
                   normalize: bool | None = None) -> torch.Tensor:
    """Couple every window of the block ``[start, stop)``: the layer runs on the consecutive
    windows ``[start, start + W), [start + W, start + 2W), ...`` (the last one may be
    shorter; the circuit sums out its missing positions), each with its own gate. One call
    covers a block of any length (e.g. LLaDA's ``block_length`` larger than the window).

    Args:
        layer: a :class:`diffusion.CoDDLayer` over ``W = layer.window`` positions.
        logits: (B, L, V) backbone logits aligned with positions.
        x: (B, L) current tokens, ``layer.mask_id`` where masked.
        start, stop: ints, ``0 <= start <= stop <= L``.
        generator, gate, normalize: passed to the layer (``normalize`` applies to the
            block's positions only).

    Returns:
        (B, L, V) logits: the block's positions replaced by the layer's output, the rest unchanged.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or not isinstance(x, torch.Tensor) or x.ndim != 2 \
            or tuple(logits.shape[:2]) != tuple(x.shape):
        raise ValueError(f"logits, x: expected (B, L, V) logits and (B, L) tokens, got "
                         f"{tuple(getattr(logits, 'shape', ()))} and {tuple(getattr(x, 'shape', ()))}")
    length = x.shape[1]
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an int, got {value!r}")
    if not 0 <= start <= stop <= length:
        raise ValueError(f"start, stop: expected 0 <= start <= stop <= {length} (the sequence length), got {start}, {stop}")
    windows = block_windows(start, stop, layer.window)
    if not windows:
        return logits
    batch, vocab = x.shape[0], logits.shape[-1]
    full = [w for w in windows if w[1] - w[0] == layer.window]
    out = logits.clone()
    if full:
        lo, hi = full[0][0], full[-1][1]
        count = len(full)
        # Full windows run as one batch of B * count rows (each row-window gated on its own).
        stacked = layer(logits[:, lo:hi].reshape(batch * count, layer.window, vocab),
                        x[:, lo:hi].reshape(batch * count, layer.window), generator=generator, gate=gate,
                        normalize=normalize)
        out[:, lo:hi] = stacked.reshape(batch, hi - lo, vocab)
    for lo, hi in windows[len(full):]:
        out[:, lo:hi] = layer(logits[:, lo:hi], x[:, lo:hi], generator=generator, gate=gate, normalize=normalize)
    return out


def block_couples(layer, x: torch.Tensor, start: int, stop: int, gate: float | None = None) -> bool:
    """Whether :func:`apply_to_block` would couple any window of ``[start, stop)`` (some row
    of some window has a masked position and a mask ratio below the gate)."""
    return any(bool(layer.gated_rows(x[:, lo:hi], gate).any()) for lo, hi in block_windows(start, stop, layer.window))
