"""Inverse-CDF categorical choice from caller-given uniforms (torch path of the sampling kernel)."""

from __future__ import annotations

import torch


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor, rows: torch.Tensor | None = None,
                owned: bool = False) -> torch.Tensor:
    """Index drawn from softmax(logits) (A, C) by inverse CDF with uniforms (A,) in [0, 1]:
    :func:`inverse_cdf_weights` of ``exp(logits - rowmax)``.

    With ``rows`` (A,) int64, ``logits`` (R, C) is a table and draw ``a`` uses row
    ``rows[a]``: the same choice as ``inverse_cdf(logits[rows], uniforms)``, with the CDF
    of each table row computed once (many draws from few distributions). ``owned``:
    ``logits`` may be overwritten (no copies of its size are made).
    """
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    weights = logits.sub_(m).exp_() if owned else torch.exp(logits - m)
    return inverse_cdf_weights(weights, uniforms, rows, owned=True)


def inverse_cdf_weights(weights: torch.Tensor, uniforms: torch.Tensor, rows: torch.Tensor | None = None,
                        owned: bool = False) -> torch.Tensor:
    """Index drawn in proportion to non-negative ``weights`` (A, C) (or rows ``rows`` (A,) of
    a table (R, C), as in :func:`inverse_cdf`) by inverse CDF with uniforms (A,) in [0, 1].

    The CDF is the running sum of each row in its own dtype. Returns (A,) int64: the first
    index whose cumulative weight exceeds ``u * total``; where ``u * total`` rounds up to the
    total, the first index at which the CDF reaches the total (so never an index of weight
    zero); 0 for a row of zeros. ``owned``: ``weights`` may be overwritten (the CDF is then
    built in place).
    """
    cats = weights.shape[-1]
    cdf = weights.cumsum_(-1) if owned else weights.cumsum(-1)
    if rows is not None:
        cdf = cdf.index_select(0, rows)
    if not cdf.numel():
        return torch.zeros(cdf.shape[0], dtype=torch.long, device=cdf.device)
    total = cdf[:, -1:]  # (A, 1)
    below = torch.nextafter(total, _zero(total))
    target = torch.minimum(uniforms.to(cdf.dtype).unsqueeze(1) * total, below)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=cats - 1)
    return index.masked_fill_(total.squeeze(1) <= 0, 0)


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-d zero of ``like``'s dtype and device (made once: ``nextafter`` needs a tensor)."""
    key = (like.dtype, like.device)
    found = _ZEROS.get(key)
    if found is None:
        found = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return found
