"""Expectation-maximisation from circuit flows: the M-step and two optimisers.

:class:`FullBatchEM` accumulates flows over any number of batches (an epoch) and then
takes one exact M-step, which never decreases the training log-likelihood.
:class:`MiniBatchEM` is stochastic (online) EM: it keeps a running average of expected
counts, ``counts <- (1 - step_size) * counts + step_size * flows(batch)``, and takes the exact
M-step of that average after every batch.

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
        step_size: 1 for the exact M-step, in (0, 1) for a damped one: the parameters move that fraction
            of the way to the M-step solution (:class:`MiniBatchEM` averages counts instead).
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
    """Stochastic (online) EM: a running average of expected counts, one M-step per batch.

    After each batch the averaged counts become
    ``counts <- (1 - step_size) * counts + step_size * flows(batch)`` and the parameters are set
    to the exact M-step of ``counts``. The average starts from the current parameters, weighted
    by the first batch's flow per node (``counts = theta * sum_c flow[n, c]``), so the first step
    is ``theta <- (1 - step_size) * theta + step_size * theta_batch``; continuous inputs start
    from the first batch's statistics. Averaging counts rather than parameters matters: a node
    that one batch barely reaches keeps what it learned from earlier batches, where a damped
    parameter update would pull it towards the pseudocount's uniform distribution.

    Args:
        circuit: the :class:`pclayer.TensorCircuit` to train (in place).
        step_size: weight in (0, 1] of each new batch in the running counts; the attribute
            may be changed between steps (a decaying schedule, as :func:`pclayer.learn.fit`
            does). 1 makes every step the exact M-step of its batch alone.
        pseudocount: total Laplace smoothing per node, relative to one batch's counts.
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
        self.counts: Flows | None = None

    def step(self, x: torch.Tensor, missing: torch.Tensor | None = None,
             soft_evidence: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> float:
        """Compute the batch's flows, fold them into the running counts and take the M-step.

        Returns the (global) batch's weighted mean log-likelihood before the step.
        """
        _check_hyper(self.step_size, self.pseudocount, self.min_std)
        flows = self._reduce(compute_flows(self.circuit, x, missing, soft_evidence, weights))
        if float(flows.weight) <= 0:
            raise ValueError("weights: the batch has total weight zero; nothing to learn from")
        if self.counts is None:
            self.counts = self._counts_of_current_parameters(flows)
        self.counts.scale_add_(1.0 - self.step_size, flows, self.step_size)
        m_step(self.circuit, self.counts, pseudocount=self.pseudocount, min_std=self.min_std)
        return float(flows.log_likelihood / flows.weight)

    @torch.no_grad()
    def _counts_of_current_parameters(self, flows: Flows) -> Flows:
        """Counts whose M-step (without pseudocount) is the current parameters: each node's
        normalised table times its total flow in ``flows``; continuous statistics as in ``flows``."""
        tables = self.circuit.log_tables()
        counts = {key: torch.exp(tables[key].to(torch.float64)) * value.sum(-1, keepdim=True)
                  for key, value in flows.counts.items()}
        return Flows(counts, {k: v.clone() for k, v in flows.statistics.items()},
                     flows.log_likelihood.clone(), flows.weight.clone())
