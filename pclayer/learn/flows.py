"""Circuit flows (expected counts) by one backward pass over the compiled layers.

For a batch with per-sample weights ``w_b``, the flow of a parameter is the gradient
of ``sum_b w_b log p(x_b)`` with respect to its *normalised* log-value: for a sum edge
(node ``n``, child ``c``) that is ``sum_b w_b P(edge n->c used | x_b)``, for a
categorical table entry (node ``n``, value ``k``) ``sum_b w_b P(node n emits k | x_b)``.
Missing values and soft evidence need no special case: both are part of the forward
pass, so the gradient is the expected count under the posterior they define.
Continuous inputs need flow-weighted sufficient statistics (their distribution's
:meth:`~pclayer.distributions.Distribution.statistics`); their node flows are the gradient
with respect to the input layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pclayer.queries.evidence import prepare, require_positive
from pclayer.representations import LOG_SUM


@dataclass
class Flows:
    """Expected counts of one or more batches, accumulated in float64.

    Attributes:
        counts: by bank key of sums and tabular inputs: tensors shaped like the circuit's
            normalised log-table, holding expected counts.
        statistics: by bank key of continuous inputs: (banks, S, n) flow-weighted sufficient
            statistics of the bank's distribution (missing entries contribute expectations).
        log_likelihood: weighted sum of the batch log-likelihoods (0-dim).
        weight: sum of the sample weights (0-dim).
    """

    counts: dict[str, torch.Tensor]
    statistics: dict[str, torch.Tensor]
    log_likelihood: torch.Tensor
    weight: torch.Tensor

    def add_(self, other: Flows) -> Flows:
        """Add ``other`` into these flows in place; returns ``self``."""
        for key, value in other.counts.items():
            self.counts[key] += value
        for key, value in other.statistics.items():
            self.statistics[key] += value
        self.log_likelihood += other.log_likelihood
        self.weight += other.weight
        return self

    def scale_add_(self, keep: float, other: Flows, weight: float) -> Flows:
        """``self <- keep * self + weight * other`` in place (a running average); returns ``self``."""
        for key, value in other.counts.items():
            self.counts[key].mul_(keep).add_(value, alpha=weight)
        for key, value in other.statistics.items():
            self.statistics[key].mul_(keep).add_(value, alpha=weight)
        self.log_likelihood.mul_(keep).add_(other.log_likelihood, alpha=weight)
        self.weight.mul_(keep).add_(other.weight, alpha=weight)
        return self

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the flows in a fixed order (for collective communication)."""
        return [*(self.counts[k] for k in sorted(self.counts)), *(self.statistics[k] for k in sorted(self.statistics)),
                self.log_likelihood, self.weight]


def check_weights(weights: torch.Tensor | None, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Validated (B,) sample weights in ``dtype`` (ones when ``weights`` is None)."""
    if weights is None:
        return torch.ones(batch, dtype=dtype, device=device)
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"weights: expected a float tensor of shape ({batch},), got {getattr(weights, 'dtype', type(weights).__name__)}")
    if tuple(weights.shape) != (batch,):
        raise ValueError(f"weights: expected shape ({batch},) (one weight per row of x), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights: expected a tensor on the circuit's device {device}, got {weights.device}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights: expected finite, non-negative sample weights")
    return weights.to(dtype)


def _continuous_statistics(circuit, node_flows: torch.Tensor, x: torch.Tensor, missing: torch.Tensor | None,
                           tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flow-weighted sufficient statistics per continuous input bank (banks, S, n)."""
    stats: dict[str, torch.Tensor] = {}
    layer = circuit.layers[0]
    start = 0
    for i, bucket in enumerate(layer.buckets):
        var, bank = getattr(layer, f"var_{i}"), getattr(layer, f"bank_{i}")
        n = bucket["num_nodes"]
        size = var.numel() * n
        distribution = bucket["distribution"]
        if not distribution.tabular:
            flow = node_flows[:, start:start + size].reshape(-1, var.numel(), n)  # (B, G, n)
            rows = tables[bucket["key"]].detach()[bank]
            gone = missing.index_select(1, var) if missing is not None else None
            per_group = distribution.statistics(rows, flow, x.index_select(1, var), gone)  # (G, S, n)
            table = stats.get(bucket["key"])
            if table is None:
                table = stats[bucket["key"]] = per_group.new_zeros(tables[bucket["key"]].shape[0], *per_group.shape[1:])
            table.index_add_(0, bank, per_group)
        start += size
    return stats


def compute_flows(circuit, x: torch.Tensor, missing: torch.Tensor | None = None,
                  soft_evidence: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> Flows:
    """Expected counts of every learnable parameter of ``circuit`` for one batch.

    Args:
        circuit: a :class:`pclayer.TensorCircuit`.
        x: (B, num_vars) data (long, or float with Gaussian variables).
        missing: (B, num_vars) bool, True = unobserved (summed out).
        soft_evidence: (B, num_vars, num_cats) log-weights multiplied into the leaves.
        weights: (B,) non-negative sample weights (default 1).

    Returns:
        :class:`Flows` of the batch (float64). Raises :class:`pclayer.ZeroProbabilityError`
        if a row has probability zero (its expected counts are undefined).
    """
    ev = prepare(circuit, x, missing, soft_evidence)
    w = check_weights(weights, ev.x.shape[0], circuit.dtype, circuit.device)
    continuous = _continuous_keys(circuit)
    with torch.enable_grad():
        with torch.no_grad():  # the normalised tables are the leaves of this graph (cached while unchanged)
            normalised = circuit.log_tables()
        tables = {key: value.detach().requires_grad_(key in circuit.params) for key, value in normalised.items()}
        if continuous:  # log-sum traversal: the input layer's output (node flows) is in the graph
            values = circuit.evaluate(LOG_SUM, ev.x, ev.missing, ev.soft_evidence, circuit.tables(tables))
            log_p = values.root(circuit)
        else:
            log_p = circuit.root_log_value(ev.x, ev.missing, ev.soft_evidence, tables=tables)
        require_positive(log_p.detach(), "learning")
        objective = (w * log_p).sum()
        leaves = [key for key, value in tables.items() if value.requires_grad and key not in continuous]
        wanted = [tables[k] for k in leaves]
        if continuous:
            wanted.append(values[0])
        grads = torch.autograd.grad(objective, wanted, allow_unused=True)
    counts = {}
    for key, grad in zip(leaves, grads):
        counts[key] = torch.zeros(tables[key].shape, dtype=torch.float64, device=x.device) if grad is None else grad.double()
    statistics = _continuous_statistics(circuit, grads[-1], ev.x, ev.missing, tables) if continuous else {}
    return Flows(counts, statistics, objective.detach().double(), w.sum().double())


def _continuous_keys(circuit) -> set[str]:
    """Learnable bank keys of continuous input distributions."""
    return {key for key, bank in circuit.plan.banks.items()
            if bank.role == "input" and bank.learnable and not circuit.bank_distribution(key).tabular}


def zero_flows(circuit) -> Flows:
    """Flows of no data: zeros shaped like :func:`compute_flows`' result for ``circuit``."""
    device = circuit.device
    continuous = _continuous_keys(circuit)
    counts, statistics = {}, {}
    for key in circuit.params:
        shape = circuit.log_tables()[key].shape if key not in continuous else None
        if shape is None:
            value = circuit.params[key]
            size = circuit.bank_distribution(key).num_statistics
            statistics[key] = torch.zeros(value.shape[0], size, value.shape[-1], dtype=torch.float64, device=device)
        else:
            counts[key] = torch.zeros(shape, dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return Flows(counts, statistics, zero.clone(), zero.clone())
