"""Circuit flows (expected counts) by one backward pass over the compiled layers.

For a batch with per-sample weights ``w_b``, the flow of a parameter is the gradient
of ``sum_b w_b log p(x_b)`` with respect to its *normalised* log-value: for a sum edge
(node ``n``, child ``c``) that is ``sum_b w_b P(edge n->c used | x_b)``, for a
categorical table entry (node ``n``, value ``k``) ``sum_b w_b P(node n emits k | x_b)``.
Missing values and soft evidence need no special case: both are part of the forward
pass, so the gradient is the expected count under the posterior they define.
Gaussian inputs need flow-weighted sufficient statistics; their node flows are the
gradient with respect to the input layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pclayer.queries.evidence import prepare, require_positive


@dataclass
class Flows:
    """Expected counts of one or more batches, accumulated in float64.

    Attributes:
        counts: by parameter key (``sum_*``, ``sparse_*``, ``cat_*``): tensors shaped like
            the circuit's normalised log-table, holding expected counts.
        gaussian: by ``gauss_*`` key: (banks, 3, n) flow-weighted statistics
            ``(sum f, sum f * x, sum f * x**2)``; missing entries contribute the node's
            expected ``x`` and ``x**2``.
        log_likelihood: weighted sum of the batch log-likelihoods (0-dim).
        weight: sum of the sample weights (0-dim).
    """

    counts: dict[str, torch.Tensor]
    gaussian: dict[str, torch.Tensor]
    log_likelihood: torch.Tensor
    weight: torch.Tensor

    def add_(self, other: Flows) -> Flows:
        """Add ``other`` into these flows in place; returns ``self``."""
        for key, value in other.counts.items():
            self.counts[key] += value
        for key, value in other.gaussian.items():
            self.gaussian[key] += value
        self.log_likelihood += other.log_likelihood
        self.weight += other.weight
        return self

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the flows in a fixed order (for collective communication)."""
        return [*(self.counts[k] for k in sorted(self.counts)), *(self.gaussian[k] for k in sorted(self.gaussian)),
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


def _gaussian_statistics(circuit, node_flows: torch.Tensor, x: torch.Tensor, missing: torch.Tensor | None,
                         tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flow-weighted (sum f, sum f x, sum f x^2) per Gaussian bank row."""
    stats: dict[str, torch.Tensor] = {}
    layer = circuit.layers[0]
    start = 0
    for i, bucket in enumerate(layer.buckets):
        var = getattr(layer, f"var_{i}")
        bank = getattr(layer, f"bank_{i}")
        n = bucket["num_nodes"]
        size = var.numel() * n
        if bucket["kind"] == "gaussian":
            flow = node_flows[:, start:start + size].reshape(-1, var.numel(), n).double()  # (B, G, n)
            params = tables[bucket["key"]].detach().double()[bank]  # (G, 2, n)
            mean, var_node = params[:, 0], torch.exp(2 * params[:, 1])
            xg = x.index_select(1, var).double().unsqueeze(-1)  # (B, G, 1)
            first, second = xg.expand_as(flow), (xg * xg).expand_as(flow)
            if missing is not None:
                gone = missing.index_select(1, var).unsqueeze(-1)
                first = torch.where(gone, mean.unsqueeze(0), first)
                second = torch.where(gone, (mean * mean + var_node).unsqueeze(0), second)
            per_group = torch.stack([flow.sum(0), (flow * first).sum(0), (flow * second).sum(0)], dim=1)  # (G, 3, n)
            table = stats.setdefault(bucket["key"], torch.zeros(tables[bucket["key"]].shape[0], 3, n, dtype=torch.float64, device=x.device))
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
    with torch.enable_grad():
        # Gaussian tables take part too, so the input layer's output (whose gradient is
        # the node flow) is in the graph; their own gradients are not used.
        with torch.no_grad():  # the normalised tables are the leaves of this graph (cached while unchanged)
            normalised = circuit.log_tables()
        tables = {key: value.detach().requires_grad_(key in circuit.params) for key, value in normalised.items()}
        if circuit.has_gaussian:  # the input layer's output is needed for the Gaussian statistics
            values = circuit.layer_values(ev.x, ev.missing, ev.soft_evidence, tables=tables)
            log_p = circuit.root_value(values)
        else:
            log_p = circuit.root_log_value(ev.x, ev.missing, ev.soft_evidence, tables=tables)
        require_positive(log_p.detach(), "learning")
        objective = (w * log_p).sum()
        leaves = [key for key, value in tables.items() if value.requires_grad and not key.startswith("gauss_")]
        wanted = [tables[k] for k in leaves]
        if circuit.has_gaussian:
            wanted.append(values[0])
        grads = torch.autograd.grad(objective, wanted, allow_unused=True)
    counts = {}
    for key, grad in zip(leaves, grads):
        counts[key] = torch.zeros(tables[key].shape, dtype=torch.float64, device=x.device) if grad is None else grad.double()
    gaussian = _gaussian_statistics(circuit, grads[-1], ev.x, ev.missing, tables) if circuit.has_gaussian else {}
    return Flows(counts, gaussian, objective.detach().double(), w.sum().double())


def zero_flows(circuit) -> Flows:
    """Flows of no data: zeros shaped like :func:`compute_flows`' result for ``circuit``."""
    device = circuit.device
    counts, gaussian = {}, {}
    for key, value in circuit.params.items():
        if key.startswith("gauss_"):
            gaussian[key] = torch.zeros(value.shape[0], 3, value.shape[2], dtype=torch.float64, device=device)
        else:
            counts[key] = torch.zeros(value.shape, dtype=torch.float64, device=device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return Flows(counts, gaussian, zero.clone(), zero.clone())
