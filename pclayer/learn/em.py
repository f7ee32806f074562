"""Expectation-maximisation from circuit flows: the M-step and two optimisers.

:class:`FullBatchEM` accumulates flows over any number of batches (an epoch) and then
takes one exact M-step, which never decreases the training log-likelihood.
:class:`MiniBatchEM` takes a damped M-step after every batch:
``theta <- (1 - step_size) * theta + step_size * theta_batch``.

The M-step of a sum node or categorical leaf is
``theta[n, c] = (flow[n, c] + pseudocount / C_n) / (sum_c flow[n, c] + pseudocount)``
(``C_n`` = the node's number of children or categories). Gaussian leaves move their
expectation parameters ``(E x, E x^2)`` the same way, with ``pseudocount``
pseudo-observations at the current parameters and the standard deviation floored at
``min_std``. Rows without flow (nodes no sample reached) and no pseudocount keep their
parameters. Tied groups share one bank row, so their flows add up before the M-step.
"""

from __future__ import annotations

import math

import torch

from pclayer.learn.distributed import all_reduce_flows
from pclayer.learn.flows import Flows, compute_flows, zero_flows
from pclayer.linear_tables import refresh_linear_tables


def _check_hyper(step_size: float, pseudocount: float, min_std: float) -> None:
    if not (isinstance(step_size, (int, float)) and 0 < step_size <= 1):
        raise ValueError(f"step_size: expected a number in (0, 1], got {step_size!r}")
    if not (isinstance(pseudocount, (int, float)) and math.isfinite(pseudocount) and pseudocount >= 0):
        raise ValueError(f"pseudocount: expected a finite number >= 0, got {pseudocount!r}")
    if not (isinstance(min_std, (int, float)) and min_std > 0):
        raise ValueError(f"min_std: expected a positive number, got {min_std!r}")


def _categorical_update(raw: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor | None,
                        step_size: float, pseudocount: float) -> torch.Tensor:
    """New probabilities of rows normalised over the last dimension, in ``raw``'s dtype:
    ``raw`` holds the current unnormalised log-weights, ``counts`` the flows."""
    logits = raw if mask is None else raw.masked_fill(~mask, -torch.inf)
    old = torch.softmax(logits, dim=-1)
    flows = counts
    counts = counts.to(raw.dtype)
    if mask is None:  # dense rows: no masking passes (this runs on every parameter every step)
        numerator = counts + pseudocount / counts.shape[-1] if pseudocount else counts
    else:
        size = mask.sum(-1, keepdim=True).to(counts.dtype)
        numerator = torch.where(mask, counts + pseudocount / size, torch.zeros_like(counts))
    total = numerator.sum(-1, keepdim=True)
    reached = total > 0
    if bool(reached.all()):  # the common case: no row keeps its parameters, so update in place
        target = numerator.div_(total) if numerator is not flows else numerator / total  # never write the flows
        return target if step_size == 1 else old.lerp_(target, step_size)
    target = numerator / torch.where(reached, total, torch.ones_like(total))
    return torch.where(reached, torch.lerp(old, target, step_size), old)


def _gaussian_update(old: torch.Tensor, stats: torch.Tensor, step_size: float, pseudocount: float,
                     min_std: float) -> torch.Tensor:
    """New (banks, 2, n) (mean, log-std) from (banks, 3, n) flow statistics."""
    mean, std = old[:, 0].double(), torch.exp(old[:, 1].double())
    second = mean * mean + std * std
    weight = stats[:, 0] + pseudocount
    first_sum = stats[:, 1] + pseudocount * mean
    second_sum = stats[:, 2] + pseudocount * second
    reached = weight > 0
    safe = torch.where(reached, weight, torch.ones_like(weight))
    target_mean = torch.where(reached, first_sum / safe, mean)
    target_second = torch.where(reached, second_sum / safe, second)
    new_mean = (1 - step_size) * mean + step_size * target_mean
    new_second = (1 - step_size) * second + step_size * target_second
    variance = (new_second - new_mean * new_mean).clamp(min=min_std * min_std)
    return torch.stack([new_mean, 0.5 * torch.log(variance)], dim=1)


@torch.no_grad()
def m_step(circuit, flows: Flows, *, step_size: float = 1.0, pseudocount: float = 0.0, min_std: float = 1e-3) -> None:
    """Set the parameters of ``circuit`` in place from ``flows``.

    Args:
        circuit: the :class:`pclayer.TensorCircuit` the flows were computed on.
        flows: expected counts, e.g. from :func:`pclayer.learn.compute_flows`.
        step_size: 1 for the exact M-step, in (0, 1) for a damped (mini-batch) one.
        pseudocount: total Laplace smoothing per node, spread evenly over its children.
        min_std: lower bound of Gaussian standard deviations.
    """
    _check_hyper(step_size, pseudocount, min_std)
    for key, counts in flows.counts.items():
        param = circuit.params[key]
        mask = getattr(circuit, f"fixed_{key}_mask") if key.startswith("sparse_") else None
        new = _categorical_update(param, counts, mask, step_size, pseudocount)
        torch.log(new, out=param)  # the new normalised log-weights, written in place
        if mask is not None:
            param.masked_fill_(~mask, 0.0)
        refresh_linear_tables(circuit, key, new)  # the next no-grad forward needs no softmax
    for key, stats in flows.gaussian.items():
        new = _gaussian_update(circuit.params[key], stats, step_size, pseudocount, min_std)
        circuit.params[key].copy_(new.to(circuit.params[key].dtype))


class _EMBase:
    def __init__(self, circuit, pseudocount: float, min_std: float, distributed: bool, process_group) -> None:
        _check_hyper(1.0, pseudocount, min_std)
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("distributed: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (torchrun does the rendezvous)")
        self.circuit = circuit
        self.pseudocount = float(pseudocount)
        self.min_std = float(min_std)
        self.distributed = distributed
        self.process_group = process_group

    def _reduce(self, flows: Flows) -> Flows:
        return all_reduce_flows(flows, self.process_group) if self.distributed else flows


class FullBatchEM(_EMBase):
    """Exact EM: :meth:`accumulate` batches, then :meth:`step` once per epoch.

    With ``distributed=True`` each rank accumulates its own shard and :meth:`step`
    all-reduces the flows (sum) so every rank applies the same M-step.

    Args:
        circuit: the :class:`pclayer.TensorCircuit` to train (in place).
        pseudocount: total Laplace smoothing per node (0 = maximum likelihood).
        min_std: lower bound of Gaussian standard deviations.
        distributed: sum flows over all ranks of ``process_group`` before the M-step.
        process_group: a ``torch.distributed`` group (default: the world).
    """

    def __init__(self, circuit, *, pseudocount: float = 0.0, min_std: float = 1e-3,
                 distributed: bool = False, process_group=None) -> None:
        super().__init__(circuit, pseudocount, min_std, distributed, process_group)
        self.flows = zero_flows(circuit)

    def accumulate(self, x: torch.Tensor, missing: torch.Tensor | None = None,
                   soft_evidence: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> float:
        """Add the flows of one batch (shapes as in :func:`pclayer.learn.compute_flows`);
        returns the batch's weighted mean log-likelihood under the current parameters."""
        batch = compute_flows(self.circuit, x, missing, soft_evidence, weights)
        self.flows.add_(batch)
        return float(batch.log_likelihood / batch.weight) if batch.weight > 0 else 0.0

    def step(self) -> float:
        """Apply the M-step to everything accumulated since the last step and reset.

        Returns the weighted mean log-likelihood of the accumulated data (over all ranks
        when distributed) under the parameters *before* the step.
        """
        flows = self._reduce(self.flows)
        if float(flows.weight) <= 0:
            raise RuntimeError("FullBatchEM.step: no data accumulated since the last step (call accumulate first)")
        m_step(self.circuit, flows, pseudocount=self.pseudocount, min_std=self.min_std)
        self.flows = zero_flows(self.circuit)
        return float(flows.log_likelihood / flows.weight)


class MiniBatchEM(_EMBase):
    """Stochastic EM: one damped M-step per batch.

    Args:
        circuit: the :class:`pclayer.TensorCircuit` to train (in place).
        step_size: interpolation weight in (0, 1] of the batch's M-step solution.
        pseudocount: total Laplace smoothing per node.
        min_std: lower bound of Gaussian standard deviations.
        distributed: sum each batch's flows over all ranks (the global batch is the
            union of the ranks' batches); every rank must call :meth:`step` equally often.
        process_group: a ``torch.distributed`` group (default: the world).
    """

    def __init__(self, circuit, *, step_size: float = 0.1, pseudocount: float = 0.0, min_std: float = 1e-3,
                 distributed: bool = False, process_group=None) -> None:
        _check_hyper(step_size, pseudocount, min_std)
        super().__init__(circuit, pseudocount, min_std, distributed, process_group)
        self.step_size = float(step_size)

    def step(self, x: torch.Tensor, missing: torch.Tensor | None = None,
             soft_evidence: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> float:
        """Compute the batch's flows and take one damped M-step.

        Returns the (global) batch's weighted mean log-likelihood before the step.
        """
        flows = self._reduce(compute_flows(self.circuit, x, missing, soft_evidence, weights))
        if float(flows.weight) <= 0:
            raise ValueError("weights: the batch has total weight zero; nothing to learn from")
        m_step(self.circuit, flows, step_size=self.step_size, pseudocount=self.pseudocount, min_std=self.min_std)
        return float(flows.log_likelihood / flows.weight)
