"""Layers of a compiled circuit: each evaluates all of its node groups in a few tensor ops.

Every layer type implements, side by side, its forward pass for every representation of
:mod:`pclayer.representations`: ``log_forward`` (log-sum and max-product, which differ only
in their sum formulas) and ``scaled_forward`` (linear space with per-row scales; None when an
entry falls below the floor, and the traversal then uses ``log_forward`` for this layer).
For the top-down pass (sampling, MPE) each layer turns a mask of active nodes into the mask
of active positions of its gathered input ``z`` (``select``; see :mod:`pclayer.topdown`).

Non-input layers first gather the nodes they read into one vector ``z`` (B, M) from
per-layer segments; children are positions in it. What a layer may read as a view instead
of a copy is decided by the optimisation passes (:mod:`pclayer.passes`) and read here from
the layer spec.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pclayer.distributions import distribution_for_bucket
from pclayer.numerics import CONVEX_SLACK, RENORMALISE_BELOW, SAFE_FLOOR
from pclayer.ops.cross_product_sum import cross_product_chunk, cross_product_sum
from pclayer.plan import InputLayerSpec, ProductLayerSpec, SumLayerSpec
from pclayer.representations import LOG_SUM, SCALED, ScaledValue, add_scales, checked, rescaled
from pclayer.runtime import DISABLED, Workspace
from pclayer.tables import Tables
from pclayer.topk import TopKEvidence

class Chooser:
    """Picks one index (A,) per row of scores (A, C) in the top-down pass: log-weights, or
    with ``linear`` non-negative weights.

    :meth:`uniforms` gives the randomness for a number of rows (None for deterministic
    choices) and :meth:`pick` chooses with it; a layer that splits its rows (top-k evidence)
    draws the uniforms for all of them first, so draws never depend on the split."""

    def uniforms(self, count: int) -> torch.Tensor | None:
        """(count,) uniforms in [0, 1), or None for a deterministic chooser."""
        return None

    def pick(self, scores: torch.Tensor, uniforms: torch.Tensor | None, rows: torch.Tensor | None = None,
             linear: bool = False, addend: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(A,) chosen indices for ``scores`` (A, C) and ``uniforms`` (A,) or None; with
        ``rows`` (A,), ``scores`` (R, C) is a table and choice ``a`` is made in its row
        ``rows[a]`` (the same choice as from ``scores[rows]``). ``linear``: the scores are
        non-negative weights, not log-weights. ``addend`` = ``(table (S, C), rows (A,))``
        adds ``table[rows[a]]`` to the log-weights of choice ``a`` (a sum node's children's
        log-values; gathered and added in one pass where a kernel does it). Callers pass
        scores of their own unless they give ``rows`` or ``addend``: the chooser may
        overwrite them."""
        raise NotImplementedError

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor | None = None, linear: bool = False,
                 addend: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.pick(scores, self.uniforms(scores.shape[0] if rows is None else rows.shape[0]), rows, linear, addend)


class ArgmaxChooser(Chooser):
    """The largest weight (MPE)."""

    def pick(self, scores: torch.Tensor, uniforms: torch.Tensor | None, rows: torch.Tensor | None = None,
             linear: bool = False, addend: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if addend is not None:
            gathered = scores if rows is None else scores.index_select(0, rows)
            return (gathered + addend[0].index_select(0, addend[1])).argmax(-1)
        best = scores.argmax(-1)
        return best if rows is None else best.index_select(0, rows)


class ActiveNodes:
    """The active nodes of one layer in the top-down pass: pairs of draw ``b`` (A,) and node
    ``node`` (A,) (int64), in no particular order. A node is active at most once per draw:
    two active nodes of one draw with a common child would both contain its scope, which
    decomposable products and smooth sums rule out (a draw's active nodes form a tree)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int, device: torch.device):
        """Join the ``(draws, nodes)`` pairs activated by the layers above for a layer of ``width`` nodes."""
        self.width = width
        if not parts:
            self.b = self.node = torch.zeros(0, dtype=torch.long, device=device)
        elif len(parts) == 1:
            self.b, self.node = parts[0]
        else:
            self.b, self.node = torch.cat([b for b, _ in parts]), torch.cat([node for _, node in parts])

    def within(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(draws, node - start) of the active nodes in ``[start, start + size)``, in order."""
        if start == 0 and size == self.width:
            return self.b, self.node
        keep = (self.node >= start) & (self.node < start + size)
        return self.b[keep], self.node[keep] - start


def _value_rows(draws: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows of a top-down pass's inputs read by ``draws`` (A,): the inputs have one row per
    draw, or (``rows`` = 1) one row shared by every draw."""
    return draws if rows > 1 else torch.zeros_like(draws)


def _bank(table: torch.Tensor, bank: int) -> torch.Tensor:
    """Bank ``bank`` of a stacked (banks, ...) table; a view without a select when there is
    one bank (under autograd a select's backward builds a zero tensor of the whole table)."""
    return table.view(table.shape[1:]) if table.shape[0] == 1 else table[bank]


def _evidence_scale(weights: torch.Tensor) -> torch.Tensor:
    """(B, 1) per-row log-scale ``m_b`` of evidence log-weights (B, V, K): the row's largest
    weight (0 where it is not finite), so ``exp(weights - m_b) <= 1``."""
    top = weights.detach().amax(dim=(1, 2)).unsqueeze(1)
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def _register(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    module.register_buffer(name, tensor, persistent=False)
    return getattr(module, name)


class LayerOutputs(list):
    """The (B, n_layer) outputs of the layers run so far, with cached column pieces.

    A layer output that later layers read in several contiguous column ranges is split
    once with ``torch.split`` (see :meth:`add`): reading a piece then costs nothing in the
    backward pass, whereas each ``narrow`` of a big output would make autograd build a
    full-size zero gradient (SliceBackward) per reader.
    """

    def __init__(self, cuts: dict[int, list[int]] | None = None):
        super().__init__()
        self.cuts = cuts or {}
        self.pieces: dict[tuple[int, int, int], torch.Tensor] = {}

    def add(self, value: torch.Tensor) -> None:
        """Append the next layer's output; split it at ``cuts[layer]`` when it takes part in autograd."""
        layer = len(self)
        self.append(value)
        widths = self.cuts.get(layer)
        if widths and value.requires_grad:
            start = 0
            for piece in value.split(widths, dim=1):
                self.pieces[(layer, start, piece.shape[1])] = piece
                start += piece.shape[1]


def read_columns(outputs: list[torch.Tensor], layer: int, start: int, length: int) -> torch.Tensor:
    """Columns ``start:start+length`` of layer ``layer``'s output, without copying (read
    through ``outputs.columns`` when the outputs convert columns on demand, as the log-values
    of :class:`pclayer.traversal.LayerValues` do)."""
    columns = getattr(outputs, "columns", None)
    if columns is not None:
        return columns(layer, start, length)
    value = outputs[layer]
    if start == 0 and length == value.shape[1]:
        return value
    if isinstance(outputs, LayerOutputs):
        piece = outputs.pieces.get((layer, start, length))
        if piece is not None:
            return piece
    return value.narrow(1, start, length)


class ScaledOutputs:
    """Layer outputs of the scaled representation: probabilities in a :class:`LayerOutputs`,
    per-layer log-scales and lower bounds."""

    def __init__(self, cuts: dict[int, list[int]]):
        self.probs = LayerOutputs(cuts)
        self.scales: list[torch.Tensor | None] = []
        self.lows: list[float] = []

    def add(self, out: ScaledValue) -> None:
        self.probs.add(out.p)
        self.scales.append(out.c)
        self.lows.append(out.low)

    def common_scale(self, layers: list[int]) -> tuple[torch.Tensor | None, dict[int, torch.Tensor | None], float]:
        """A common log-scale for reading ``layers`` together, each layer's factor to reach it
        (``exp(c_l - c) <= 1``; None = no rescaling) and a lower bound of the rescaled entries."""
        if len(layers) == 1:
            return self.scales[layers[0]], {layers[0]: None}, self.lows[layers[0]]
        scales = {layer: self.scales[layer] for layer in set(layers)}
        distinct = {id(c): c for c in scales.values()}
        if len(distinct) == 1:
            return next(iter(distinct.values())), {layer: None for layer in scales}, min(self.lows[l] for l in scales)
        filled = [torch.zeros_like(next(c for c in distinct.values() if c is not None)) if c is None else c
                  for c in distinct.values()]
        common = torch.stack(filled).amax(0)
        factors = {layer: torch.exp((torch.zeros_like(common) if c is None else c) - common) for layer, c in scales.items()}
        low = min(self.lows[layer] * (float(factors[layer].amin()) if factors[layer].numel() else 1.0) for layer in scales)
        return common, factors, low


class _Reader(nn.Module):
    """A layer that gathers the nodes it reads from earlier layers' outputs."""

    def _init_sources(self, spec: ProductLayerSpec | SumLayerSpec) -> None:
        self.source_layers = [segment.layer for segment in spec.sources]
        self.source_spans = [segment.span for segment in spec.sources]
        self.width = 0
        for i, segment in enumerate(spec.sources):
            _register(self, f"source_{i}", segment.index)
            self.width += segment.index.numel()

    def reads(self) -> list[tuple[int, int, int]]:
        """Contiguous (layer, start, length) column ranges this layer reads without a copy."""
        return [(layer, span[0], span[1]) for layer, span in zip(self.source_layers, self.source_spans) if span is not None]

    def gather(self, outputs: list[torch.Tensor], factors: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor:
        """(B, M) vector of the nodes this layer reads; ``factors`` rescale (scaled outputs)."""
        parts = []
        for i, layer in enumerate(self.source_layers):
            span = self.source_spans[i]
            if span is not None:
                part = read_columns(outputs, layer, span[0], span[1])
            else:
                part = outputs[layer].index_select(1, getattr(self, f"source_{i}"))
            factor = None if factors is None else factors[layer]
            parts.append(part if factor is None else part * factor)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def gather_scaled(self, outputs: ScaledOutputs) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """(B, M) probabilities at one common scale, the scale, and a lower bound of the entries."""
        common, factors, low = outputs.common_scale(self.source_layers)
        return self.gather(outputs.probs, factors), common, low

    def activate(self, active: ActiveNodes, values, tables: Tables, chooser: Chooser,
                 pending: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """One step of the top-down pass: the children this layer's ``active`` nodes activate
        (:meth:`select`), handed to their layers in ``pending`` (:meth:`scatter_active`)."""
        self.scatter_active(*self.select(active, values, tables, chooser), pending)

    def scatter_active(self, b: torch.Tensor, position: torch.Tensor,
                       pending: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Hand the active positions of ``z`` (pairs of draw ``b`` and ``position``, (A,)
        each) to the source layers, as (draws, nodes) pairs appended to ``pending[layer]``."""
        start = 0
        for i, layer in enumerate(self.source_layers):
            index = getattr(self, f"source_{i}")
            if len(self.source_layers) == 1:
                draws, local = b, position
            else:
                keep = (position >= start) & (position < start + index.numel())
                draws, local = b[keep], position[keep] - start
            span = self.source_spans[i]
            pending[layer].append((draws, local + span[0] if span is not None else index.index_select(0, local)))
            start += index.numel()


def _categorical_rows(table: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, g, j] = table[bank[g], j, idx[b, g]]``: table (banks, n, K), bank (G,), idx (B, G) -> (B, G, n).

    When the table is not much bigger than the output, it is transposed once to (banks*K, n)
    so that every (b, g) reads one contiguous row; otherwise (huge K) the entries are gathered
    one by one."""
    banks, n, k = table.shape
    batch, groups = idx.shape
    if table.numel() <= 2 * batch * groups * n:
        rows = (bank * k)[None, :] + idx
        return table.transpose(1, 2).reshape(banks * k, n).index_select(0, rows.reshape(-1)).view(batch, groups, n)
    nodes = torch.arange(n, device=idx.device)
    return table[bank[None, :, None], nodes[None, None, :], idx[:, :, None]]


def _topk_weights(evidence: TopKEvidence) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, exp(values - m_b))`` of top-k evidence: the per-row scale ``m`` (B, 1) (largest
    weight, free variables counting as 0) and the candidates' weights (B, V, c), at most 1."""
    weights = evidence.values if evidence.free is None else evidence.values.masked_fill(evidence.free.unsqueeze(-1), 0.0)
    scale = _evidence_scale(weights)
    return scale, torch.exp(weights - scale.unsqueeze(2))


def _observed_evidence(ev: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, G, 1) evidence weights ``exp(ev[b, g, idx[b, g]] - scale_b)`` of the observed values
    ``idx`` (B, G) under log-weights ``ev`` (B, G, K) with per-row scale ``scale`` (B, 1):
    exponentiated only where read, at most 1."""
    return torch.exp(torch.gather(ev, 2, idx.unsqueeze(-1)) - scale.unsqueeze(2))


def _missing_row_weights(ev: torch.Tensor, scale: torch.Tensor, gone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat (b * G + g) indices (R,) of the missing entries ``gone`` (B, G) and their
    evidence weights ``exp(ev - scale_b)`` (R, K), from log-weights ``ev`` (B, G, K)."""
    batch, groups, k = ev.shape
    rows = gone.reshape(-1).nonzero().squeeze(1)
    return rows, torch.exp(ev.reshape(batch * groups, k).index_select(0, rows) - scale.index_select(0, rows // groups))


def _one_table_values(table: torch.Tensor, idx: torch.Tensor, ev: torch.Tensor, scale: torch.Tensor,
                      gone: torch.Tensor) -> torch.Tensor:
    """(B, G, n) values of the groups of one table (1, n, K) under evidence ``ev`` (B, G, K)
    log-weights with per-row scale ``scale`` (B, 1): ``table[0, :, idx] * exp(ev[idx] - scale)``
    where observed, ``sum_k exp(ev[k] - scale) table[0, :, k]`` where ``gone`` (B, G)."""
    batch, groups, k = ev.shape
    n = table.shape[1]
    flat = torch.arange(n, device=idx.device)[None, None, :] * k + idx[:, :, None]  # (B, G, n)
    rows, w = _missing_row_weights(ev, scale, gone)
    entries, marginal = _SharedTableReads.apply(table, flat, w)
    value = entries * _observed_evidence(ev, idx, scale)
    return value.reshape(batch * groups, n).index_copy(0, rows, marginal).view(batch, groups, n)


class _SharedTableReads(torch.autograd.Function):
    """Both reads of a one-bank table (1, n, K) under evidence with missing entries, as one
    operation: ``entries = table.reshape(-1)[flat]`` (observed values, ``flat`` (B, G, n)
    entry indices) and ``marginal = w @ table[0].T`` ((R, K) weights of the missing rows ->
    (R, n)). Backward writes the table's gradient once: the product's gradient into a fresh
    tensor, the entries' gradients added into it in place (two separate reads would cost a
    table-size zero tensor, and a table-size sum, per step)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, flat: torch.Tensor, w: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(table, flat, w)
        return table.reshape(-1)[flat], torch.mm(table[0], w.t()).t()

    @staticmethod
    def backward(ctx, grad_entries: torch.Tensor, grad_marginal: torch.Tensor):  # type: ignore[override]
        table, flat, w = ctx.saved_tensors
        grad_table = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_table = torch.empty_like(table)
            torch.mm(grad_marginal.t(), w, out=grad_table[0])
            grad_table.view(-1).index_add_(0, flat.reshape(-1), grad_entries.reshape(-1))
        if ctx.needs_input_grad[2]:
            grad_w = grad_marginal @ table[0]
        return grad_table, None, grad_w


class InputLayer(nn.Module):
    """All input groups: per bucket a distribution's values, or the value summed out."""

    def __init__(self, spec: InputLayerSpec):
        super().__init__()
        self.buckets = []
        for i, bucket in enumerate(spec.buckets):
            _register(self, f"bank_{i}", bucket.group_bank)
            _register(self, f"var_{i}", bucket.group_var)
            self.buckets.append({"key": bucket.key, "num_nodes": bucket.num_nodes, "num_cats": bucket.num_cats,
                                 "shared": bucket.shared_bank, "var_start": bucket.var_start,
                                 "distribution": distribution_for_bucket(bucket.distribution, bucket.num_cats)})
        self.num_nodes = sum(b.num_nodes * b.group_bank.numel() for b in spec.buckets)
        self.all_tabular = all(b["distribution"].tabular for b in self.buckets)

    def _columns(self, i: int, tensor: torch.Tensor) -> torch.Tensor:
        """The variables of bucket ``i`` from a (B, V, ...) tensor: (B, G, ...), a view when
        they are a contiguous run."""
        start = self.buckets[i]["var_start"]
        var = getattr(self, f"var_{i}")
        return tensor.narrow(1, start, var.numel()) if start is not None else tensor.index_select(1, var)

    def _bank_rows(self, i: int, tables: dict, broadcast: bool) -> torch.Tensor:
        """Normalised bank rows of bucket ``i``: (G, ...) or (1, ...) when shared and ``broadcast``."""
        bucket = self.buckets[i]
        table = tables[bucket["key"]]
        if bucket["shared"] is not None and broadcast:
            return table if table.shape[0] == 1 else table[bucket["shared"]].unsqueeze(0)
        return table.index_select(0, getattr(self, f"bank_{i}"))

    def log_forward(self, tables: dict, x: torch.Tensor, missing: torch.Tensor | None, evidence,
                    representation, runtime=None) -> torch.Tensor:
        """Input log-values (B, num_input_nodes) in a log-space representation.

        ``tables`` maps bank keys to normalised tables ((banks, n, K) log-probabilities for
        tabular distributions, stored banks for continuous ones); ``x`` is (B, V) float or
        long, ``missing`` (B, V) bool, ``evidence`` (B, V, K) log-weights or top-k evidence.
        """
        outs = []
        for i, bucket in enumerate(self.buckets):
            var = getattr(self, f"var_{i}")
            xg = self._columns(i, x)
            distribution = bucket["distribution"]
            if not distribution.tabular:
                rows = self._bank_rows(i, tables, broadcast=False)
                value = distribution.log_density(rows, xg)
                marginal = representation.continuous_summed_out(distribution, rows).unsqueeze(0)
            else:
                k = bucket["num_cats"]
                table = tables[bucket["key"]]  # (banks, n, K)
                idx = xg.long().clamp(0, k - 1)
                if bucket["shared"] is not None:
                    # columns of the bank, read in its own layout (so its gradient is too)
                    value = _bank(table, bucket["shared"]).index_select(1, idx.reshape(-1)).t().reshape(*idx.shape, table.shape[1])
                else:
                    value = _categorical_rows(table, getattr(self, f"bank_{i}"), idx)
                if isinstance(evidence, TopKEvidence):
                    value, marginal = self._topk_values(i, tables, value, idx, var, missing, evidence, representation, runtime)
                else:
                    ev = None
                    if evidence is not None:
                        ev = self._columns(i, evidence)[:, :, :k]
                        value = value + torch.gather(ev, 2, idx.unsqueeze(-1))
                    marginal = None
                    if missing is not None:
                        rows = self._bank_rows(i, tables, broadcast=True)
                        marginal = (representation.sum_dense(ev, rows, runtime) if ev is not None
                                    else representation.no_evidence(rows, runtime).unsqueeze(0))
            if missing is not None:
                value = torch.where(self._columns(i, missing).unsqueeze(-1), marginal, value)
            outs.append(value.flatten(1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _topk_values(self, i: int, tables: dict, value: torch.Tensor, idx: torch.Tensor, var: torch.Tensor,
                     missing: torch.Tensor | None, evidence: TopKEvidence, representation,
                     runtime) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Observed values (B, G, n) times their top-k weight, and the summed-out values
        (B, G|1, n) under top-k evidence (None when nothing is missing)."""
        values = self._columns(i, evidence.values)
        indices = self._columns(i, evidence.indices)
        free = self._columns(i, evidence.free) if evidence.free is not None else None
        match = indices == idx.unsqueeze(-1)  # (B, G, k): at most one candidate equals the value
        weight = torch.where(match, values, torch.zeros_like(values)).sum(-1)
        weight = torch.where(match.any(-1), weight, torch.full_like(weight, -torch.inf))
        if free is not None:
            weight = torch.where(free, torch.zeros_like(weight), weight)
        value = value + weight.unsqueeze(-1)
        if missing is None:
            return value, None
        rows = self._bank_rows(i, tables, broadcast=True)
        marginal = representation.topk_evidence(values, indices, rows, runtime)
        if free is not None:  # no host-side test of whether any free variable is missing
            marginal = torch.where(free.unsqueeze(-1), representation.no_evidence(rows, runtime).unsqueeze(0), marginal)
        return value, marginal

    def scaled_forward(self, tables: Tables, x: torch.Tensor, missing: torch.Tensor | None, evidence,
                       workspace: Workspace, runtime=None) -> ScaledValue | torch.Tensor:
        """Input probabilities in the scaled representation, or the (B, n) log-values where
        some entry would fall below the floor. Tabular inputs under dense (or no) evidence are
        computed in linear space: rows of the evidence are shifted by their maximum ``m_b``,
        observed entries are ``theta[x] exp(w[x] - m_b)`` and summed-out ones one matrix
        product ``exp(w - m_b) @ theta^T`` with the linear tables. Under top-k evidence with
        cached tables that calls reuse, every entry reads rows of the transposed linear
        tables: one per observed value, and the ``k`` candidates' rows weighted by
        ``exp(w - m_b)`` per summed-out one (otherwise the log path reads only the
        candidates' entries of the log-tables)."""
        if self.all_tabular:
            value = None
            if isinstance(evidence, TopKEvidence):
                value = self._linear_topk_values(tables, x, missing, evidence)
            elif evidence is None and missing is None and self._tables_are_small(tables, x.shape[0]):
                value = self._observed_probabilities(tables, x, workspace)
            else:
                value = self._linear_values(tables, x, missing, evidence)
            if value is not None:
                return value
        log_values = self.log_forward(tables.log, x, missing, evidence, LOG_SUM, runtime)
        value = rescaled(log_values)
        return log_values if value is None else value

    def _linear_topk_values(self, tables: Tables, x: torch.Tensor, missing: torch.Tensor | None,
                            evidence: TopKEvidence) -> ScaledValue | None:
        """Tabular inputs under top-k evidence in linear space (see :meth:`scaled_forward`);
        ``m_b`` is the largest weight of row ``b`` (0 for variables without evidence). None
        when a transposed table is not worth building (see :meth:`Tables.linear_if_reused`)."""
        if not tables.cached and len(self.buckets) == 1 and tables.circuit.bank_tensor(self.buckets[0]["key"]).shape[0] == 1:
            return self._topk_values_from_columns(tables, x, missing, evidence)
        transposed = [tables.linear_if_reused(bucket["key"], transposed=True) for bucket in self.buckets]
        if any(table is None for table in transposed):
            return None
        free = evidence.free
        scale, weights = _topk_weights(evidence)
        outs = []
        for i, bucket in enumerate(self.buckets):
            k, n = bucket["num_cats"], bucket["num_nodes"]
            linear = transposed[i].view(-1, n)  # row bank * K + category
            first = (getattr(self, f"bank_{i}") * k)[None, :]  # (1, G)
            idx, candidates, w, picked = self._topk_columns(i, x, evidence, weights)
            value = linear.index_select(0, (first + idx).reshape(-1)).view(*idx.shape, n) * picked.unsqueeze(-1)
            if missing is not None:
                value = self._with_topk_marginals(linear, first, candidates, w, self._columns(i, missing),
                                                  None if free is None else self._columns(i, free), value)
            outs.append(value.flatten(1))
        return checked(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), scale, 0.0)

    def _topk_values_from_columns(self, tables: Tables, x: torch.Tensor, missing: torch.Tensor | None,
                                  evidence: TopKEvidence) -> ScaledValue | None:
        """:meth:`_linear_topk_values` for one bucket over a one-bank table under autograd:
        reads only the table's columns of the observed values and the candidates
        (:meth:`Tables.linear_columns`), so the table's gradient costs one pass, not a
        transposed copy nor a table-size zero tensor."""
        bucket = self.buckets[0]
        n = bucket["num_nodes"]
        free = evidence.free
        scale, weights = _topk_weights(evidence)
        idx, candidates, w, picked = self._topk_columns(0, x, evidence, weights)
        batch, groups, c = candidates.shape
        gone = torch.zeros_like(idx, dtype=torch.bool) if missing is None else self._columns(0, missing)
        columns = tables.linear_columns(bucket["key"], torch.cat([idx.reshape(-1), candidates.reshape(-1)]))[0]  # (n, BG(1 + c))
        value = columns[:, : batch * groups].t().reshape(batch, groups, n) * picked.unsqueeze(-1)
        marginal = torch.einsum("nrc,rc->rn", columns[:, batch * groups:].reshape(n, batch * groups, c),
                                w.reshape(batch * groups, c)).reshape(batch, groups, n)
        if free is not None:  # no evidence: a normalised row sums to one
            marginal = torch.where(self._columns(0, free).unsqueeze(-1), w[:, :, :1], marginal)
        value = torch.where(gone.unsqueeze(-1), marginal, value)
        return checked(value.flatten(1), scale, 0.0)

    def _topk_columns(self, i: int, x: torch.Tensor, evidence: TopKEvidence, weights: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bucket ``i``'s columns of the values ``x`` (B, G), of the candidates (B, G, c), of the
        weights ``weights`` (B, V, c) from :func:`_topk_weights`, and the weight of each
        observed value (B, G): its candidate's weight, 0 if it is no candidate, and where a
        variable is free the weight every category has, ``exp(0 - m_b)``."""
        idx = self._columns(i, x).long().clamp(0, self.buckets[i]["num_cats"] - 1)
        candidates = self._columns(i, evidence.indices)
        w = self._columns(i, weights)
        picked = torch.where(candidates == idx.unsqueeze(-1), w, torch.zeros_like(w)).sum(-1)
        if evidence.free is not None:
            picked = torch.where(self._columns(i, evidence.free), w[:, :, 0], picked)
        return idx, candidates, w, picked

    @staticmethod
    def _with_topk_marginals(linear: torch.Tensor, first: torch.Tensor, candidates: torch.Tensor, w: torch.Tensor,
                             gone: torch.Tensor, free: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        """``value`` (B, G, n) with its missing entries ``gone`` (B, G) replaced by
        ``sum_j w[b, g, j] theta[g, n, candidates[b, g, j]]`` (rows of the transposed linear
        table ``linear``, bank ``g`` starting at row ``first[0, g]``); free entries (no
        evidence) sum a normalised row to one: ``w[b, g, 0]``."""
        batch, groups, n = value.shape
        k = w.shape[-1]
        rows = gone.reshape(-1).nonzero().squeeze(1)
        if not len(rows):
            return value
        flat_w = w.reshape(batch * groups, k).index_select(0, rows)  # (R, k)
        flat_rows = (first.unsqueeze(-1) + candidates).reshape(batch * groups, k).index_select(0, rows)
        step = max(1, (1 << 22) // max(k * n, 1))  # candidate rows gathered at a time: 16 MB in float32
        parts = [torch.bmm(flat_w[r:r + step].unsqueeze(1),
                           linear.index_select(0, flat_rows[r:r + step].reshape(-1)).view(-1, k, n)).squeeze(1)
                 for r in range(0, len(rows), step)]
        marginal = torch.cat(parts) if len(parts) > 1 else parts[0]
        if free is not None:
            free_rows = free.reshape(-1).index_select(0, rows).unsqueeze(1)
            marginal = torch.where(free_rows, flat_w[:, :1].expand(-1, n), marginal)
        return value.reshape(batch * groups, n).index_copy(0, rows, marginal).view(batch, groups, n)

    def _linear_values(self, tables: Tables, x: torch.Tensor, missing: torch.Tensor | None,
                       evidence: torch.Tensor | None) -> ScaledValue | None:
        """Tabular inputs in linear space (see :meth:`scaled_forward`)."""
        scale = None if evidence is None else _evidence_scale(evidence)
        outs = []
        for i, bucket in enumerate(self.buckets):
            bank = getattr(self, f"bank_{i}")
            k = bucket["num_cats"]
            idx = self._columns(i, x).long().clamp(0, k - 1)
            linear = tables.linear(bucket["key"])  # (banks, n, K)
            if evidence is not None and missing is not None and linear.shape[0] == 1 \
                    and linear.numel() > 2 * idx.numel() * bucket["num_nodes"]:  # one big table (a vocabulary)
                outs.append(_one_table_values(linear, idx, self._columns(i, evidence)[:, :, :k], scale,
                                              self._columns(i, missing)).flatten(1))
                continue
            value = _categorical_rows(linear, bank, idx)  # (B, G, n)
            ev = None
            if evidence is not None:
                ev = self._columns(i, evidence)[:, :, :k]  # (B, G, K) log-weights
                value = value * _observed_evidence(ev, idx, scale)
            if missing is not None:
                gone = self._columns(i, missing)
                if ev is None:  # a normalised table sums to one; under autograd the sum carries the flows
                    marginal = torch.ones_like(value[:1]) if tables.cached else \
                        self._bank_rows(i, {bucket["key"]: linear}, broadcast=True).sum(-1).unsqueeze(0)
                    value = torch.where(gone.unsqueeze(-1), marginal, value)
                else:
                    value = self._with_linear_marginals(i, tables, ev, scale, gone, value)
            outs.append(value.flatten(1))
        p = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return checked(p, scale, 0.0)

    def _with_linear_marginals(self, i: int, tables: Tables, ev: torch.Tensor, scale: torch.Tensor,
                               gone: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``value`` (B, G, n) with its missing entries ``gone`` (B, G) replaced by
        ``sum_k w[b, g, k] theta[g, n, k]`` with weights ``w = exp(ev - scale_b)`` (``ev``
        (B, G, K) log-weights, ``scale`` (B, 1)); with one shared table only the missing rows
        are exponentiated and go through the matrix product."""
        bucket = self.buckets[i]
        batch, groups, _ = ev.shape
        if bucket["shared"] is None:
            theta = tables.linear(bucket["key"]).index_select(0, getattr(self, f"bank_{i}"))  # (G, n, K)
            w = torch.exp(ev - scale.unsqueeze(2))
            return torch.where(gone.unsqueeze(-1), torch.einsum("bgk,gnk->bgn", w, theta), value)
        theta = _bank(tables.linear(bucket["key"]), bucket["shared"]).t()  # (K, n): a transposed view, no copy
        rows, w = _missing_row_weights(ev, scale, gone)
        marginal = w @ theta  # (R, n)
        return value.reshape(batch * groups, -1).index_copy(0, rows, marginal).view(batch, groups, -1)

    def _tables_are_small(self, tables: Tables, batch: int) -> bool:
        """Whether every table is at most twice the size of what a batch reads from it: only
        then is a transposed linear copy of the tables worth keeping."""
        return all(tables.circuit.bank_tensor(b["key"]).shape[0] * b["num_nodes"] * b["num_cats"]
                   <= 2 * batch * getattr(self, f"var_{i}").numel() * b["num_nodes"] for i, b in enumerate(self.buckets))

    def _observed_probabilities(self, tables: Tables, x: torch.Tensor, workspace: Workspace) -> ScaledValue | None:
        """(B, num_input_nodes) probabilities of tabular inputs, fully observed, without
        evidence: one row read per (row, variable) from the transposed linear tables."""
        outs, low = [], 1.0
        for i, bucket in enumerate(self.buckets):
            var, bank = getattr(self, f"var_{i}"), getattr(self, f"bank_{i}")
            k, n = bucket["num_cats"], bucket["num_nodes"]
            linear = tables.linear(bucket["key"], transposed=True).view(-1, n)  # (banks, K, n) as rows
            low = min(low, tables.smallest(bucket["key"], transposed=True))
            idx = x.index_select(1, var).long().clamp(0, k - 1)
            rows = (bank * k)[None, :] + idx
            out = workspace.take(0, (rows.numel(), n), linear) if len(self.buckets) == 1 else None
            outs.append(torch.index_select(linear, 0, rows.reshape(-1), out=out).view(x.shape[0], var.numel() * n))
        owned = len(self.buckets) == 1 and workspace.enabled
        return checked(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), None, low, owned=owned)

    def _table_rows(self, i: int, tables: dict, bank: torch.Tensor, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (R, K) rows of bucket ``i``'s table in ``tables`` and the row (A,) of each input
        node ``node`` (A,) with bank rows ``bank`` (A,)."""
        table = tables[self.buckets[i]["key"]]  # (banks, n, K)
        shared = self.buckets[i]["shared"]
        if shared is not None:
            return _bank(table, shared), node
        return table.reshape(-1, table.shape[-1]), bank * table.shape[1] + node

    def _node_rows(self, i: int, tables: dict, bank: torch.Tensor, node: torch.Tensor,
                   scratch: Workspace = DISABLED) -> torch.Tensor:
        """(A, K) rows of input nodes ``node`` (A,) with bank rows ``bank`` (A,) from the
        (banks, n, K) table of bucket ``i`` in ``tables`` (into a ``scratch`` buffer when enabled)."""
        rows, index = self._table_rows(i, tables, bank, node)
        return torch.index_select(rows, 0, index, out=scratch.scratch("draw-rows", (len(index), rows.shape[1]), rows))

    def emit(self, active: ActiveNodes, batch: int, tables: Tables, x: torch.Tensor, missing: torch.Tensor | None,
             evidence, chooser: Chooser, normals: Callable[[int], torch.Tensor] | None,
             linear: bool, scratch: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
        """Values of the active input nodes (one per draw and variable) of ``batch`` draws.

        Returns ``(x_out (B, V), node (B, V) active input node index)``; observed entries of ``x`` are kept, missing ones drawn by
        ``chooser`` (tabular inputs; see :meth:`_choose_values` for ``linear``) or by the
        distribution (continuous inputs: draws from ``normals``, modes without). ``x``,
        ``missing`` and ``evidence`` have one row per draw or one row shared by all;
        ``scratch`` holds the (draws, K) temporaries.
        """
        num_vars = x.shape[1]
        rows = x.shape[0]
        x_out = x.expand(batch, -1).clone()
        node = torch.full((batch, num_vars), -1, dtype=torch.long, device=x.device)
        log = tables.log
        start = 0
        for i, bucket in enumerate(self.buckets):
            var_of_group = getattr(self, f"var_{i}")
            n = bucket["num_nodes"]
            size = var_of_group.numel() * n
            b, flat = active.within(start, size)
            g, j = flat // n, flat % n
            var = var_of_group[g]
            bank = getattr(self, f"bank_{i}")[g]
            node[b, var] = start + flat
            distribution = bucket["distribution"]
            start += size
            if missing is None:  # nothing to draw
                continue
            draw = missing[_value_rows(b, rows), var]
            b, var, bank, j = b[draw], var[draw], bank[draw], j[draw]
            if not distribution.tabular:
                value = distribution.draw(log[bucket["key"]][bank], j, None if normals is None else normals(len(j)))
                x_out[b, var] = value.to(x_out.dtype)
            elif isinstance(evidence, TopKEvidence):
                _emit_topk(x_out, b, _value_rows(b, rows), var, tables, bucket["key"], bank * n + j, evidence, chooser)
            elif len(b):
                weights = None
                if evidence is not None:
                    read = _value_rows(b, rows) * num_vars + var
                    table = evidence.reshape(rows * num_vars, -1)
                    out = scratch.scratch("draw-evidence", (len(read), table.shape[1]), table)
                    weights = torch.index_select(table, 0, read, out=out)[:, :bucket["num_cats"]]
                x_out[b, var] = self._choose_values(i, tables, bank, j, weights, chooser, linear, scratch).to(x_out.dtype)
        return x_out, node

    def node_log_probs(self, node: torch.Tensor, tables: Tables, num_cats: int, dtype: torch.dtype,
                       categories: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities under the input nodes ``node`` (A,) (indices within this layer) of
        every category, (A, num_cats) (``-inf`` beyond the node's categories; into ``out`` when
        given), or of ``categories`` (A, k) only; ``-inf`` for continuous inputs. ``tables``:
        the evaluation's tables (only the rows read are normalised, see
        :meth:`Tables.log_rows`); ``dtype``: the circuit's."""
        width = max(num_cats, 1) if categories is None else categories.shape[-1]
        if out is None:
            out = torch.empty((len(node), width), dtype=dtype, device=node.device)
        start, filled = 0, False
        for i, bucket in enumerate(self.buckets):
            n, k = bucket["num_nodes"], bucket["num_cats"]
            size = getattr(self, f"var_{i}").numel() * n
            local = node - start
            start += size
            if not bucket["distribution"].tabular:
                continue
            key = bucket["key"]
            if len(self.buckets) == 1 and (categories is not None or k == width):  # every node, every column
                row = getattr(self, f"bank_{i}")[local // n] * n + local % n
                if categories is None:
                    return tables.log_rows(key, row, out=out)
                return _entries_or_minus_inf(tables, key, row, categories, k, out)
            if not filled:
                out.fill_(-torch.inf)
                filled = True
            (a,) = ((local >= 0) & (local < size)).nonzero(as_tuple=True)
            flat = local[a]
            row = getattr(self, f"bank_{i}")[flat // n] * n + flat % n
            if categories is None:
                out[a, :k] = tables.log_rows(key, row)
            else:
                out[a] = _entries_or_minus_inf(tables, key, row, categories[a], k, None)
        if not filled:
            out.fill_(-torch.inf)
        return out

    def _choose_values(self, i: int, tables: Tables, bank: torch.Tensor, node: torch.Tensor,
                       evidence: torch.Tensor | None, chooser: Chooser, linear: bool, scratch: Workspace) -> torch.Tensor:
        """(A,) values chosen for input nodes ``node`` (A,) of tabular bucket ``i`` (bank rows
        ``bank``) under ``evidence`` (A, K) log-weights or None. Without evidence and with
        ``linear``, from the rows of the linear table (a normalised row never vanishes);
        otherwise from log-values (evidence can put every category far below the floor)."""
        key = self.buckets[i]["key"]
        if linear and evidence is None:  # never touches the log-tables (a cold call need not build them)
            return chooser(self._node_rows(i, {key: tables.linear(key)}, bank, node, scratch), linear=True)
        like = tables.circuit.bank_tensor(key)
        rows = scratch.scratch("draw-rows", (len(node), self.buckets[i]["num_cats"]), like)
        scores = tables.log_rows(key, bank * self.buckets[i]["num_nodes"] + node, out=rows)
        return chooser(scores if evidence is None else scores.add_(evidence))


def _entries_or_minus_inf(tables: Tables, key: str, row: torch.Tensor, categories: torch.Tensor, k: int,
                          out: torch.Tensor | None) -> torch.Tensor:
    """(A, c) log-probabilities of ``categories`` (A, c) in rows ``row`` (A,) of input bank
    ``key``'s log-table with ``k`` categories; ``-inf`` outside ``[0, k)``."""
    inside = (categories >= 0) & (categories < k)
    entries = tables.log_entries(key, row, categories.clamp(0, k - 1))
    return torch.where(inside, entries, torch.full_like(entries, -torch.inf), out=out)


def _emit_topk(x_out: torch.Tensor, b: torch.Tensor, eb: torch.Tensor, var: torch.Tensor, tables: Tables, key: str,
               row: torch.Tensor, evidence: TopKEvidence, chooser: Chooser) -> None:
    """Draw the values of active tabular inputs ``(b, var)`` (A,), whose log-probabilities are
    the rows ``row`` (A,) of input bank ``key``'s flattened log-table (see
    :meth:`Tables.log_rows`), under top-k evidence (its rows ``eb`` (A,)) into
    ``x_out``: among the k candidates (sorted by category, so inverse-CDF draws match the dense
    evidence's; only their k entries of the table are read), or among all categories where
    the variable is ``free``."""
    free = evidence.free[eb, var] if evidence.free is not None else torch.zeros_like(b, dtype=torch.bool)
    uniforms = chooser.uniforms(len(b))  # one per row, in row order, whichever group it falls in
    for rows, sparse in ((~free, True), (free, False)):
        if not bool(rows.any()):
            continue
        u = None if uniforms is None else uniforms[rows]
        if sparse:
            candidates = evidence.indices[eb[rows], var[rows]]  # (R, k)
            logits = tables.log_entries(key, row[rows], candidates) + evidence.values[eb[rows], var[rows]]
            chosen = candidates.gather(1, chooser.pick(logits, u).unsqueeze(1)).squeeze(1)
        else:
            chosen = chooser.pick(tables.log_rows(key, row[rows]), u)
        x_out[b[rows], var[rows]] = chosen.to(x_out.dtype)


def _multiply(parts: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise product of ``parts`` (at least two when ``out``, a buffer, is given)."""
    if len(parts) == 1:
        return parts[0]
    result = torch.mul(parts[0], parts[1], out=out)
    for part in parts[2:]:
        result = result.mul_(part) if out is not None else result * part
    return result


def _running_product(parts: list[torch.Tensor], scales: list[torch.Tensor | None], lows: list[float],
                     out: torch.Tensor | None) -> ScaledValue | None:
    """Elementwise product of (B, n) factors with scales and lower bounds, multiplied one by
    one (into ``out`` when given); the running product is checked (and its rows renormalised)
    before a factor could take its proven bound below the renormalisation threshold, so
    products of many factors (HCLT) need no second pass."""
    if len(parts) == 1:
        return ScaledValue(parts[0], scales[0], lows[0])
    renormalise_below = RENORMALISE_BELOW[parts[0].dtype]
    result = torch.mul(parts[0], parts[1], out=out)
    owned = True
    scale, low = add_scales(scales[0], scales[1]), lows[0] * lows[1]
    for part, part_scale, part_low in zip(parts[2:], scales[2:], lows[2:]):
        if low * part_low < renormalise_below:
            value = checked(result, scale, low, owned=owned)
            if value is None:
                return None
            result, scale, low = value.p, value.c, value.low
        result = result.mul_(part) if out is not None else result * part
        scale, low = add_scales(scale, part_scale), low * part_low
    return checked(result, scale, low, owned=out is not None)


def _column_sources(spec: ProductLayerSpec) -> list[tuple[int, int]] | None:
    """Per child column of a product layer, (source segment, its first position in ``z``)
    when every child in the column lies in that one segment; None if some column spans two."""
    bounds, start = [], 0
    for segment in spec.sources:
        bounds.append((start, start + segment.index.numel()))
        start += segment.index.numel()
    columns = []
    for f in range(spec.children.shape[1]):
        column = spec.children[:, f]
        if not column.numel():
            return None
        low, high = int(column.min()), int(column.max())
        found = [(i, a) for i, (a, b) in enumerate(bounds) if a <= low and high < b]
        if not found:
            return None
        columns.append(found[0])
    return columns


class ProductLayer(_Reader):
    """Products: sums of children's log-values, or products of their probabilities."""

    def __init__(self, spec: ProductLayerSpec):
        super().__init__()
        self._init_sources(spec)
        _register(self, "child_index", spec.children)
        _register(self, "child_index_columns", spec.children.t().contiguous())  # (F, P): each child column contiguous
        self.padded = bool(spec.padded)
        self.num_nodes = spec.children.shape[0]
        self.column_reads = spec.column_reads
        self.child_starts = spec.child_starts or [None] * spec.children.shape[1]
        self.outer = spec.outer
        self.outer_strides = spec.outer_strides
        if self.outer is not None:
            _register(self, "outer_left", self.outer[0].reshape(-1))
            _register(self, "outer_right", self.outer[1].reshape(-1))
        self.column_sources = None if self.padded else _column_sources(spec)

    def reads(self) -> list[tuple[int, int, int]]:
        return self.column_reads if self.column_reads is not None else super().reads()

    @property
    def fan_in(self) -> int:
        return self.child_index.shape[1]

    def child_columns(self, z: torch.Tensor) -> list[torch.Tensor]:
        """(B, P) values of every product's ``f``-th child, for each ``f``, from the gathered
        ``z`` (B, M). When the children's column runs tile ``z``, ``z`` is split once (under
        autograd a narrow per child would build a full-size zero gradient each)."""
        p = self.num_nodes
        starts = self.child_starts
        if all(start is not None for start in starts) and z.shape[1] == p * len(starts) and p > 0 \
                and sorted(starts) == list(range(0, z.shape[1], p)):
            pieces = z.split(p, dim=1)
            return [pieces[start // p] for start in starts]
        return [z.narrow(1, start, p) if start is not None else z.index_select(1, self.child_index[:, f])
                for f, start in enumerate(starts)]

    def _outer_parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        groups, left, right = self.outer[0].shape[0], self.outer[0].shape[1], self.outer[1].shape[1]
        a = z.index_select(1, self.outer_left).view(z.shape[0], groups, left, 1)
        b = z.index_select(1, self.outer_right).view(z.shape[0], groups, 1, right)
        return a, b

    fused_cross_products = False  # products are never fused into the layer before them

    def log_forward(self, outputs: list[torch.Tensor], logweights: dict | None = None, representation=None,
                    runtime=None) -> torch.Tensor:
        """(B, P) log-values: the sum of every product's children's log-values (the same in
        every log-space representation)."""
        if self.column_reads is not None:
            parts = [read_columns(outputs, *read) for read in self.column_reads]
            out = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
            for part in parts[2:]:
                out += part
            return out
        z = self.gather(outputs)
        if self.outer is not None:  # blocks of cross products: one broadcast add, no big gathers
            a, b = self._outer_parts(z)
            return (a + b).reshape(z.shape[0], self.num_nodes)
        if self.padded:
            z = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)
        columns = self.child_columns(z)
        out = columns[0]
        for column in columns[1:]:
            out = out + column
        return out

    def scaled_forward(self, outputs: ScaledOutputs, tables: Tables | None, workspace: Workspace,
                       slot: int) -> ScaledValue | None:
        """(B, P) probabilities: the product of every product's children; None below the floor."""
        if self.column_reads is not None:
            parts = [read_columns(outputs.probs, *read) for read in self.column_reads]
            scales = [outputs.scales[s] for s, _, _ in self.column_reads]
            lows = [outputs.lows[s] for s, _, _ in self.column_reads]
            out = workspace.take(slot, parts[0].shape, parts[0]) if len(parts) > 1 else None
            result = _running_product(parts, scales, lows, out)
            if result is None:  # small factors: bring each factor's largest entry per row to 1 first
                tops = [part.detach().amax(1, keepdim=True) for part in parts]
                tops = [torch.where(top > 0, top, torch.ones_like(top)) for top in tops]
                scale = None
                for s, top in zip(scales, tops):
                    scale = add_scales(add_scales(scale, s), top.log())
                result = checked(_multiply([part / top for part, top in zip(parts, tops)]), scale, 0.0)
            return result
        z, common, low = self.gather_scaled(outputs)
        if self.padded:  # a padded child is the value 1 at every scale: pad with exp(-common)
            pad = torch.ones_like(z[:, :1]) if common is None else torch.exp(-common)
            if not bool((pad <= 1).all()):
                return None
            z, low = torch.cat([z, pad], dim=1), min(low, float(pad.min()) if pad.numel() else 1.0)
        if low ** self.fan_in < RENORMALISE_BELOW[z.dtype]:  # many small factors: first bring each row's largest to 1
            top = z.detach().amax(1, keepdim=True)
            top = torch.where(top > 0, top, torch.ones_like(top))
            z, common, low = z / top, add_scales(common, top.log()), 0.0
        scale = None if common is None else common * self.fan_in
        if self.outer is not None:
            a, b = self._outer_parts(z)
            return checked((a * b).reshape(z.shape[0], self.num_nodes), scale, low * low)
        return checked(_multiply(self.child_columns(z)), scale, low ** self.fan_in)

    def activate(self, active: ActiveNodes, values, tables: Tables, chooser: Chooser,
                 pending: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Every child of an active product is active. When each child column lies in one
        source segment, its nodes go straight to that segment's layer (no split of the
        gathered positions by segment)."""
        if self.column_sources is None:
            super().activate(active, values, tables, chooser, pending)
            return
        for f, (i, start) in enumerate(self.column_sources):
            local = self.child_index_columns[f].index_select(0, active.node)  # positions in z
            span = self.source_spans[i]
            if span is not None:  # the segment is a contiguous run of its layer's nodes
                nodes = local if span[0] == start else local + (span[0] - start)
            else:
                nodes = getattr(self, f"source_{i}").index_select(0, local - start if start else local)
            pending[self.source_layers[i]].append((active.b, nodes))

    def select(self, active: ActiveNodes, outputs: list[torch.Tensor], tables: dict,
               chooser: Chooser) -> tuple[torch.Tensor, torch.Tensor]:
        """Active positions of ``z`` as (draws, positions) pairs: every child of an active product."""
        children = self.child_index.index_select(0, active.node)  # (A, F)
        b = active.b.unsqueeze(1).expand_as(children)
        if self.padded:  # padding positions (= width) are not nodes
            keep = children < self.width
            return b[keep], children[keep]
        return b.reshape(-1), children.reshape(-1)


class SumLayer(_Reader):
    """Sums: per dense bucket one batched matrix product; per sparse group a padded sum."""

    def __init__(self, spec: SumLayerSpec):
        super().__init__()
        self._init_sources(spec)
        self.dense = []
        for i, bucket in enumerate(spec.dense):
            _register(self, f"dense_children_{i}", bucket.children)
            _register(self, f"dense_bank_{i}", bucket.group_bank)
            groups, child_count = bucket.children.shape
            self.dense.append({"key": bucket.key, "shared": bucket.shared_bank, "groups": groups,
                               "child_count": child_count, "start": bucket.children_start,
                               "bank_start": bucket.bank_start})
        self.sparse = []
        for i, bucket in enumerate(spec.sparse):
            _register(self, f"sparse_children_{i}", bucket.children)
            self.sparse.append({"key": bucket.key})
        self.fused_cross_products = spec.fused_cross_products

    def single_banks(self) -> set[tuple[str, int]]:
        """(key, bank) of the dense buckets whose groups all use one weight bank."""
        return {(spec["key"], spec["shared"]) for spec in self.dense if spec["shared"] is not None}

    def dense_logw(self, i: int, logweights: dict, broadcast: bool) -> torch.Tensor:
        """Weights of dense bucket ``i`` from ``logweights`` (log or linear tables by key):
        (G, N, C), or (1, N, C) when every group shares one bank and ``broadcast``."""
        spec = self.dense[i]
        table = logweights[spec["key"]]
        if spec["shared"] is not None and broadcast:
            view = logweights.get((spec["key"], spec["shared"]))  # type: ignore[call-overload]
            return (table[spec["shared"]] if view is None else view).unsqueeze(0)
        if spec["bank_start"] is not None:  # consecutive banks: a view (its backward is a slice)
            return table.narrow(0, spec["bank_start"], spec["groups"])
        return table.index_select(0, getattr(self, f"dense_bank_{i}"))

    def dense_inputs(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """(B, G, C) children of dense bucket ``i`` from the gathered ``z``."""
        spec = self.dense[i]
        width = spec["groups"] * spec["child_count"]
        if spec["start"] == 0 and width == z.shape[1]:
            return z.view(z.shape[0], spec["groups"], spec["child_count"])
        if spec["start"] is not None:
            return z.narrow(1, spec["start"], width).view(z.shape[0], spec["groups"], spec["child_count"])
        return z.index_select(1, getattr(self, f"dense_children_{i}").reshape(-1)).view(
            z.shape[0], spec["groups"], spec["child_count"])

    def _sparse_inputs(self, i: int, z: torch.Tensor, pad: float) -> torch.Tensor:
        """(B, N, F) children of sparse group ``i`` (``pad`` at padding positions)."""
        zp = torch.cat([z, z.new_full((z.shape[0], 1), pad)], dim=1)
        children = getattr(self, f"sparse_children_{i}")
        return zp.index_select(1, children.reshape(-1)).view(z.shape[0], *children.shape)

    def log_forward(self, outputs: list[torch.Tensor], logweights: dict, representation,
                    runtime=None) -> torch.Tensor:
        """(B, n) log-values; ``logweights`` maps bank keys to normalised log-weights."""
        z = self.gather(outputs)
        outs = [representation.sum_dense(self.dense_inputs(i, z), self.dense_logw(i, logweights, True), runtime).flatten(1)
                for i in range(len(self.dense))]
        for i, spec in enumerate(self.sparse):
            outs.append(representation.sum_padded(self._sparse_inputs(i, z, -torch.inf) + logweights[spec["key"]], runtime))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def dense_weights(self, i: int, tables: Tables) -> torch.Tensor:
        """Linear weights of dense bucket ``i`` transposed for ``x @ w``: (C, N) when every
        group uses one bank, else (G, C, N)."""
        spec = self.dense[i]
        if not tables.cached and spec["shared"] is not None:  # one differentiable table for every layer reading the bank
            return _bank(tables.linear(spec["key"]), spec["shared"]).t()
        if not tables.cached:  # exp of the (bank views of the) log-tables, so gradients flow per bank
            return torch.exp(self.dense_logw(i, tables.log, True)).transpose(1, 2)
        if spec["shared"] is not None:
            return tables.bank_weights(spec["key"], spec["shared"])
        linear = tables.linear(spec["key"])
        return self.dense_logw(i, {spec["key"]: linear}, True).transpose(1, 2)

    def scaled_forward(self, outputs: ScaledOutputs, tables: Tables, workspace: Workspace, slot: int) -> ScaledValue | None:
        """(B, n) probabilities; None below the floor."""
        z, common, low = self.gather_scaled(outputs)
        if len(self.dense) == 1 and not self.sparse:  # the matrix product is the layer output
            x, w = self.dense_inputs(0, z), self.dense_weights(0, tables)
            out = workspace.take(slot, (x.shape[0], x.shape[1] * w.shape[-1]), z)
            s, owned = SCALED.sum_dense(x, w, out), out is not None
        else:
            outs = [SCALED.sum_dense(self.dense_inputs(i, z), self.dense_weights(i, tables)) for i in range(len(self.dense))]
            for i, spec in enumerate(self.sparse):
                outs.append(SCALED.sum_padded(self._sparse_inputs(i, z, 0.0) * tables.linear(spec["key"])))
            s, owned = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), False
        # every sum is a convex combination of its children (normalised weights), so it is at
        # least their smallest entry; the slack covers rounding of the weights and the product
        return checked(s, common, low * CONVEX_SLACK, owned=owned)

    def scaled_fused_forward(self, product: ProductLayer, outputs: ScaledOutputs, tables: Tables,
                             workspace: Workspace, slot: int) -> ScaledValue | None:
        """This layer over the cross-product layer ``product`` before it, without materialising
        all cross products (:func:`pclayer.ops.cross_product_sum`). None when the factors'
        lower bound cannot prove that no cross product underflows."""
        z, common, low = product.gather_scaled(outputs)
        if not low * low >= SAFE_FLOOR[z.dtype]:
            return None
        groups, left, right = product.outer[0].shape[0], product.outer[0].shape[1], product.outer[1].shape[1]
        batch = z.shape[0]
        a = _group_major(z, product.outer_left, groups, workspace, "left", product.outer_strides[0])
        c = _group_major(z, product.outer_right, groups, workspace, "right", product.outer_strides[1])
        w = self.dense_weights(0, tables)  # (left*right, N) or (G, left*right, N)
        n = w.shape[-1]
        chunk = cross_product_chunk(groups, batch, left * right)
        s = cross_product_sum(a, c, w, crosses=workspace.scratch("crosses", (chunk, batch, left, right), z),
                              out=workspace.scratch("sums", (groups, batch, n), z))
        result = workspace.take(slot, (batch, groups * n), z)
        if result is None:
            result = s.transpose(0, 1).reshape(batch, groups * n)
        else:
            result.view(batch, groups, n).copy_(s.transpose(0, 1))
        return checked(result, None if common is None else common * 2, low * low * CONVEX_SLACK, owned=workspace.enabled)

    def select(self, active: ActiveNodes, values, tables: Tables,
               chooser: Chooser) -> tuple[torch.Tensor, torch.Tensor]:
        """Active positions of ``z`` as (draws, positions) pairs: each active sum node picks
        one child with probability proportional to weight times child value (or the best one
        for MPE). ``values`` (a :class:`pclayer.traversal.LayerValues`) have one row per draw
        or one row shared by all; the choice is made in linear space (weights times scaled
        child values) when every source layer is scaled, else from log-values."""
        linear = values.scaled is not None and not any(layer in values.logged for layer in self.source_layers)
        if linear:
            z = self.gather_scaled(values.scaled)[0]
            weights, pad = {spec["key"]: tables.linear(spec["key"]) for spec in self.dense + self.sparse}, 0.0
        else:
            z, weights, pad = self.gather(values), tables.log, -torch.inf
        combine = torch.mul if linear else torch.add
        picked = []
        start = 0
        for i, spec in enumerate(self.dense):
            x = self.dense_inputs(i, z)
            w = self.dense_logw(i, weights, True)
            n = w.shape[1]
            size = spec["groups"] * n
            b, flat = active.within(start, size)
            g, j = (None, flat) if spec["groups"] == 1 else (flat // n, flat % n)  # (None: group 0)
            if z.shape[0] == 1 and spec["groups"] * n <= len(b):  # shared values, more draws than nodes:
                table = combine(w, x[0].unsqueeze(1)).reshape(-1, w.shape[-1])  # one distribution per node
                chosen = chooser(table, flat, linear=linear)
            else:  # node rows of the weights, each with its draw's children's values
                table, rows = (w[0], j) if w.shape[0] == 1 else (w.reshape(-1, w.shape[-1]), flat)
                values = x.reshape(-1, x.shape[-1])  # (rows * G, C)
                if linear and g is None and z.shape[0] == 1:  # every draw reads the one row of children
                    chosen = chooser(table.index_select(0, rows).mul_(values), linear=True)
                else:
                    value_rows = _value_rows(b, z.shape[0])
                    value_rows = value_rows if g is None else value_rows * x.shape[1] + g
                    if linear:
                        chosen = chooser(table.index_select(0, rows).mul_(values.index_select(0, value_rows)), linear=True)
                    else:
                        chosen = chooser(table, rows, addend=(values, value_rows))
            children = getattr(self, f"dense_children_{i}")
            picked.append((b, children[0].index_select(0, chosen) if g is None else children[g, chosen]))
            start += size
        if self.sparse:
            zp = torch.cat([z, z.new_full((z.shape[0], 1), pad)], dim=1)
            for i, spec in enumerate(self.sparse):
                children = getattr(self, f"sparse_children_{i}")
                size = children.shape[0]
                b, j = active.within(start, size)
                scores = combine(weights[spec["key"]][j], zp[_value_rows(b, z.shape[0])[:, None], children[j]])
                chosen = chooser(scores, linear=linear)
                picked.append((b, children[j, chosen]))
                start += size
        if len(picked) == 1:
            return picked[0]
        return torch.cat([b for b, _ in picked]), torch.cat([position for _, position in picked])


def _group_major(z: torch.Tensor, index: torch.Tensor, groups: int, workspace: Workspace, name: str,
                 stride: tuple[int, int] | None) -> torch.Tensor:
    """(G, B, S) contiguous copy of the columns ``index`` (G*S,) of ``z`` (B, M), read group by
    group; ``stride`` = ``(start, step)`` when the groups are evenly spaced runs of columns
    (read then as a strided view without a gather; only into a workspace buffer)."""
    batch, size = z.shape[0], index.numel() // groups
    out = workspace.scratch(name, (groups, batch, size), z)
    if stride is not None and out is not None and z.stride(1) == 1:
        start, step = stride
        view = z.as_strided((batch, groups, size), (z.stride(0), step, 1), z.storage_offset() + start)
        return out.copy_(view.transpose(0, 1))
    picked = workspace.scratch(name + "-picked", (batch, index.numel()), z)
    picked = torch.index_select(z, 1, index, out=picked)
    if out is None:
        return picked.view(batch, groups, size).transpose(0, 1).contiguous()
    return out.copy_(picked.view(batch, groups, size).transpose(0, 1))


LAYER_TYPES = {InputLayerSpec: InputLayer, ProductLayerSpec: ProductLayer, SumLayerSpec: SumLayer}
"""The module class of every layer spec type."""
