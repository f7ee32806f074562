"""Expectation-maximisation from circuit flows: the M-step and two optimisers.

:class:`FullBatchEM` accumulates flows over any number of batches (an epoch) and then
takes one exact M-step, which never decreases the training log-likelihood.
:class:`MiniBatchEM` takes a damped M-step after every batch:
``theta <- (1 - step_size) * theta + step_size * theta_batch``.

The M-step of a sum node is
``theta[n, c] = (flow[n, c] + pseudocount / C_n) / (sum_c flow[n, c] + pseudocount)``
(``C_n`` = the node's number of children). Input distributions own their M-step
(:meth:`~pclayer.distributions.Distribution.m_step` from table counts: the same formula for
categorical leaves; :meth:`~pclayer.distributions.Distribution.update_from_statistics` for
continuous ones, e.g. Gaussians move ``(E x, E x^2)`` with ``pseudocount`` pseudo-observations
at the current parameters and the standard deviation floored at ``min_std``). Rows without flow (nodes no sample reached) and no pseudocount keep their
parameters. Tied groups share one bank row, so their flows add up before the M-step.
"""

from __future__ import annotations

import math

import torch

from pclayer.learn.distributed import all_reduce_flows
from pclayer.learn.flows import Flows, compute_flows, zero_flows
from pclayer.distributions import smoothed_table_update


def _check_hyper(step_size: float, pseudocount: float, min_std: float) -> None:
    if not (isinstance(step_size, (int, float)) and 0 < step_size <= 1):
        raise ValueError(f"step_size: expected a number in (0, 1], got {step_size!r}")
    if not (isinstance(pseudocount, (int, float)) and math.isfinite(pseudocount) and pseudocount >= 0):
        raise ValueError(f"pseudocount: expected a finite number >= 0, got {pseudocount!r}")
    if not (isinstance(min_std, (int, float)) and min_std > 0):
        raise ValueError(f"min_std: expected a positive number, got {min_std!r}")


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
        bank = circuit.plan.banks[key]
        if bank.role == "input":  # the distribution maps table counts to its parameters
            new = circuit.bank_distribution(key).m_step(param, counts, step_size, pseudocount)
        else:
            mask = circuit.fixed_tensor(bank.mask) if bank.mask else None
            logits = param if mask is None else param.masked_fill(~mask, -torch.inf)
            new = smoothed_table_update(torch.softmax(logits, dim=-1), counts, mask, step_size, pseudocount)
            torch.log(new, out=param)  # the new normalised log-weights, written in place
            if mask is not None:
                param.masked_fill_(~mask, 0.0)
        circuit.parameters_updated(key, new)  # the next no-grad forward needs no softmax
    for key, stats in flows.statistics.items():
        new = circuit.bank_distribution(key).update_from_statistics(circuit.params[key], stats, step_size,
                                                                     pseudocount, min_std)
        circuit.params[key].copy_(new)


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
