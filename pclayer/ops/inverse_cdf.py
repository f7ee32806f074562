"""Inverse-CDF categorical choice from caller-given uniforms (torch path of the sampling kernel)."""

from __future__ import annotations

import torch


def inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from softmax(logits) (A, C) by inverse CDF with uniforms (A,) in [0, 1].

    Returns (A,) int64: the first index whose cumulative probability exceeds
    ``u * total``, clamped to the last index of positive probability (0 if there is none).
    """
    m = logits.amax(-1, keepdim=True)
    probs = torch.exp(logits - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=max(probs.shape[-1] - 1, 0))
    if not probs.numel():
        return index
    # An index of zero probability is chosen only where u * total rounds up to the total (or
    # every entry is zero): those rows take their last index of positive probability.
    stuck = probs.gather(1, index.unsqueeze(1)).squeeze(1) == 0
    if bool(stuck.any()):
        rows = stuck.nonzero().squeeze(1)
        positive = probs.index_select(0, rows) > 0
        last = (positive.cumsum(-1).argmax(-1))
        index = index.index_put((rows,), last)
    return index
