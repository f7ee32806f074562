"""The CoDD training objective (paper Eq. 7): the ELBO-weighted exact conditional NLL."""

from __future__ import annotations

import torch

from diffusion.evidence import SparseLogits
from diffusion.layer import CoDDLayer


def mask_ratio(x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B,) fraction of the row's positions equal to ``mask_id`` (float64)."""
    return (x_t == mask_id).to(torch.float64).mean(dim=1)


def codd_loss(layer: CoDDLayer, x_0: torch.Tensor, logits: torch.Tensor | SparseLogits, x_t: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted exact negative log-likelihood of the product of experts, per masked token.

    ``loss = (1/B) * sum_b weight_b * (-log p_hat(x_0,b^M | x_t,b)) / w``, with ``w`` the
    number of window positions. With the default ``weight_b = 1/t_b`` (the MDLM / LLaDA
    ELBO weight for the linear schedule) and ``t_b`` defined as the row's mask ratio
    ``|M_b| / w``, each row contributes its NLL per masked token, so the loss is the
    mean per-masked-token NLL (in nats). Rows with no masked position contribute 0 (their
    NLL is 0; their weight would be infinite). When ``t`` was sampled explicitly (as in
    :func:`diffusion.train_codd`), pass ``weight = 1 / t``.

    Args:
        layer: the :class:`CoDDLayer` (its temperature applies; train with 1.0).
        x_0: (B, w) clean tokens.
        logits: (B, w, V) backbone logits computed from ``x_t`` (frozen backbone), or
            :class:`~diffusion.SparseLogits` (B, w, k) candidates (e.g. cached top-k logits).
        x_t: (B, w) noisy tokens, ``layer.mask_id`` at masked positions.
        weight: optional (B,) non-negative finite per-row weights.

    Returns:
        Scalar loss, differentiable with respect to the circuit parameters (and ``logits``).
    """
    log_p = layer.log_prob(x_0, logits, x_t)
    batch, width = x_t.shape
    if batch == 0:
        raise ValueError("x_t: empty batch (B = 0); the loss is a mean over rows and needs at least one")
    has_mask = (x_t == layer.mask_id).any(dim=1)
    if weight is None:
        ratio = mask_ratio(x_t, layer.mask_id)
        weight = torch.where(has_mask, 1.0 / ratio.clamp_min(1.0 / width), torch.zeros_like(ratio))
    else:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight: expected a float tensor of shape ({batch},), got {getattr(weight, 'dtype', type(weight).__name__)}")
        if tuple(weight.shape) != (batch,):
            raise ValueError(f"weight: expected shape ({batch},), got {tuple(weight.shape)}")
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError("weight: expected finite non-negative values")
        weight = torch.where(has_mask, weight.to(torch.float64), torch.zeros_like(weight, dtype=torch.float64))
    nll = torch.where(has_mask, -log_p, torch.zeros_like(log_p))
    return (weight.to(nll.dtype) * nll).sum() / (batch * width)
