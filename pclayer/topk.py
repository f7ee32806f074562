"""Top-k sparse soft evidence: k weighted candidate categories per variable."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class TopKEvidence:
    """Soft evidence given on ``k`` candidate categories per variable.

    Stands for the dense (B, num_vars, num_cats) log-weights
    ``w[b, i, indices[b, i, j]] = values[b, i, j]`` and ``w[b, i, x] = -inf`` for every
    other category x; where ``free[b, i]`` is True the variable carries no evidence
    (``w[b, i, :] = 0``, its values and indices are ignored but must still be valid).
    Accepted by every query wherever ``soft_evidence`` is.

    Attributes:
        values: (B, num_vars, k) float log-weights (finite or ``-inf``); differentiable.
        indices: (B, num_vars, k) int64 distinct categories per (b, i), in
            ``[0, num categories of variable i)``.
        free: optional (B, num_vars) bool: variables without evidence.
    """

    values: torch.Tensor
    indices: torch.Tensor
    free: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """(B, num_vars, k)."""
        return tuple(self.values.shape)

    def expand(self, batch: int) -> TopKEvidence:
        """The single-row evidence repeated ``batch`` times (a view)."""
        free = self.free.expand(batch, -1) if self.free is not None else None
        return TopKEvidence(self.values.expand(batch, -1, -1), self.indices.expand(batch, -1, -1), free)

    def to_dense(self, num_cats: int) -> torch.Tensor:
        """The equivalent dense (B, num_vars, num_cats) log-weights (differentiable in ``values``)."""
        batch, num_vars, _ = self.values.shape
        dense = torch.full((batch, num_vars, num_cats), -torch.inf, dtype=self.values.dtype, device=self.values.device)
        dense = dense.scatter(-1, self.indices, self.values)
        if self.free is not None:
            dense = torch.where(self.free.unsqueeze(-1), torch.zeros_like(dense), dense)
        return dense
