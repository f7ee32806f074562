"""Inverse-CDF categorical choice from caller-given uniforms (torch path of the sampling kernel)."""

from __future__ import annotations

import torch


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Index drawn from softmax(logits) (A, C) by inverse CDF with uniforms (A,) in [0, 1].

    With ``rows`` (A,) int64, ``logits`` (R, C) is a table and draw ``a`` uses row
    ``rows[a]``: the same choice as ``inverse_cdf(logits[rows], uniforms)``, with the CDF
    of each table row computed once (many draws from few distributions).

    Returns (A,) int64: the first index whose cumulative probability exceeds
    ``u * total``, clamped to the last index of positive probability (0 if there is none).
    """
    m = logits.amax(-1, keepdim=True)
    probs = torch.exp(logits - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    cdf = probs.cumsum(-1)
    if rows is not None:
        cdf = cdf.index_select(0, rows)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=max(probs.shape[-1] - 1, 0))
    if not probs.numel():
        return index
    # An index of zero probability is chosen only where u * total rounds up to the total (or
    # every entry is zero): those draws take their row's last index of positive probability.
    source = rows if rows is not None else torch.arange(index.shape[0], device=index.device)
    stuck = probs[source, index] == 0
    if bool(stuck.any()):
        draws = stuck.nonzero().squeeze(1)
        positive = probs.index_select(0, source.index_select(0, draws)) > 0
        last = (positive.cumsum(-1).argmax(-1))
        index = index.index_put((draws,), last)
    return index
