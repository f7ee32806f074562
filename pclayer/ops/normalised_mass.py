"""The log-mass of normalised categorical tables: a discrete input summed out without evidence."""

from __future__ import annotations

import torch


class _NormalisedLogMass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_table: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(log_table)
        return log_table.new_zeros(log_table.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (log_table,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * torch.exp(log_table)


def normalised_log_mass(log_table: torch.Tensor) -> torch.Tensor:
    """``log sum_k theta[..., k]`` of a normalised log-table (..., K): exactly zeros (...,),
    without reading the table (no kernel launch, no pass over a vocabulary-size table).

    Its gradient is that of log-sum-exp at a total of one, ``grad * theta`` (the expected
    counts a summed-out variable contributes to EM). The caller guarantees normalisation."""
    if not isinstance(log_table, torch.Tensor) or not log_table.is_floating_point() or log_table.dim() < 1:
        raise ValueError(f"log_table: expected a floating tensor with at least one dimension, got "
                         f"{getattr(log_table, 'shape', type(log_table).__name__)}")
    return _NormalisedLogMass.apply(log_table)
