"""Layers of a compiled circuit: each evaluates all of its node groups in a few tensor ops.

Every layer maps the outputs of earlier layers (a list of (B, n_layer) log-value
tensors) to its own (B, n_layer) output. Non-input layers first gather the nodes they
read into one vector ``z`` (B, M) from per-layer segments; children are positions in it.
For the top-down pass (sampling, MPE) each layer turns a boolean mask of active nodes
into the mask of active positions of ``z`` (see :mod:`pclayer.topdown`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pclayer.ops import dispatch
from pclayer.semiring import Semiring
from pclayer.topk import TopKEvidence

Chooser = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""Picks one index per row of log-weights (A, C), given uniforms (A,) or None."""


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
        """Append the next layer's output; split it at ``cuts[layer]`` (piece widths) when
        it takes part in autograd."""
        layer = len(self)
        self.append(value)
        widths = self.cuts.get(layer)
        if widths and value.requires_grad:
            start = 0
            for piece in value.split(widths, dim=1):
                self.pieces[(layer, start, piece.shape[1])] = piece
                start += piece.shape[1]


def read_columns(outputs: list[torch.Tensor], layer: int, start: int, length: int) -> torch.Tensor:
    """Columns ``start:start+length`` of layer ``layer``'s output, without copying: the whole
    tensor, a cached piece of a :class:`LayerOutputs`, or a narrow view."""
    value = outputs[layer]
    if start == 0 and length == value.shape[1]:
        return value
    if isinstance(outputs, LayerOutputs):
        piece = outputs.pieces.get((layer, start, length))
        if piece is not None:
            return piece
    return value.narrow(1, start, length)


def _contiguous_start(index: torch.Tensor) -> int | None:
    """``a`` if ``index`` is ``a, a+1, ..., a+len-1`` (non-empty), else None."""
    if index.numel() == 0:
        return None
    start = int(index[0])
    return start if torch.equal(index, torch.arange(start, start + index.numel(), device=index.device)) else None


class _GatherMixin(nn.Module):
    def reads(self) -> list[tuple[int, int, int]]:
        """Contiguous (layer, start, length) column ranges this layer reads without a copy."""
        return [(layer, span[0], span[1]) for layer, span in zip(self.source_layers, self.source_ranges) if span is not None]

    def _init_sources(self, segments: list) -> None:
        self.source_layers = [int(layer) for layer, _ in segments]
        self.source_ranges: list[tuple[int, int] | None] = []
        self.width = 0
        for i, (_, index) in enumerate(segments):
            _register(self, f"source_{i}", index)
            contiguous = bool(index.numel() and torch.equal(index, torch.arange(int(index[0]), int(index[0]) + index.numel())))
            self.source_ranges.append((int(index[0]), index.numel()) if contiguous else None)
            self.width += index.numel()

    def gather(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """(B, M) vector of the nodes this layer reads."""
        parts = []
        for i, layer in enumerate(self.source_layers):
            span = self.source_ranges[i]
            if span is not None:
                parts.append(read_columns(outputs, layer, span[0], span[1]))
            else:
                parts.append(outputs[layer].index_select(1, getattr(self, f"source_{i}")))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def scatter_active(self, active_z: torch.Tensor, active: list[torch.Tensor]) -> None:
        """OR the active positions of ``z`` (B, M) into the source layers' masks."""
        start = 0
        for i, layer in enumerate(self.source_layers):
            index = getattr(self, f"source_{i}")
            part = active_z[:, start:start + index.numel()]
            active[layer].index_copy_(1, index, active[layer].index_select(1, index) | part)
            start += index.numel()


def sample_chooser(logits: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Exact categorical draw by inverse CDF (uniforms must be given)."""
    assert uniforms is not None
    return dispatch.inverse_cdf(logits, uniforms)


def argmax_chooser(logits: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Deterministic choice of the largest log-weight (MPE)."""
    return logits.argmax(-1)


def _categorical_rows(table: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, g, j] = table[bank[g], j, idx[b, g]]``: table (banks, n, K), bank (G,), idx (B, G) -> (B, G, n).

    When the table is not much bigger than the output, it is transposed once to (banks*K, n)
    so that every (b, g) reads one contiguous row (an ``index_select``, whose backward is a
    fast ``index_add_``); otherwise (huge K) the entries are gathered one by one."""
    banks, n, k = table.shape
    batch, groups = idx.shape
    if table.numel() <= 2 * batch * groups * n:
        rows = (bank * k)[None, :] + idx
        return table.transpose(1, 2).reshape(banks * k, n).index_select(0, rows.reshape(-1)).view(batch, groups, n)
    nodes = torch.arange(n, device=idx.device)
    return table[bank[None, :, None], nodes[None, None, :], idx[:, :, None]]


class InputLayer(nn.Module):
    """All input groups: per bucket a gather of log-probabilities, or a soft-evidence product."""

    def __init__(self, spec: dict):
        super().__init__()
        self.buckets = []
        for i, bucket in enumerate(spec["buckets"]):
            _register(self, f"bank_{i}", bucket["group_bank"])
            _register(self, f"var_{i}", bucket["group_var"])
            shared = int(bucket["group_bank"][0]) if bool((bucket["group_bank"] == bucket["group_bank"][0]).all()) else None
            self.buckets.append({k: bucket[k] for k in ("kind", "key", "num_nodes", "num_cats")} | {"shared": shared})
        self.num_nodes = sum(b["num_nodes"] * int(s["group_bank"].numel()) for b, s in zip(self.buckets, spec["buckets"]))

    def _tables(self, i: int, bucket: dict, tables: dict[str, torch.Tensor], broadcast: bool) -> torch.Tensor:
        table = tables[bucket["key"]]
        if bucket["shared"] is not None and broadcast:
            return table[bucket["shared"]].unsqueeze(0)
        return table.index_select(0, getattr(self, f"bank_{i}"))

    def forward(self, tables: dict[str, torch.Tensor], x: torch.Tensor, missing: torch.Tensor | None,
                evidence: torch.Tensor | None, semiring: Semiring) -> torch.Tensor:
        """Input log-values (B, num_input_nodes).

        ``tables`` maps bucket keys to (banks, n, K) log-probabilities (or, for Gaussian
        buckets, (banks, 2, n) mean and log-std); ``x`` is (B, V) float or long,
        ``missing`` (B, V) bool, ``evidence`` (B, V, K) log-weights.
        """
        outs = []
        batch = x.shape[0]
        for i, bucket in enumerate(self.buckets):
            var = getattr(self, f"var_{i}")
            n = bucket["num_nodes"]
            xg = x.index_select(1, var)
            if bucket["kind"] == "gaussian":
                params = self._tables(i, bucket, tables, broadcast=False)  # (G, 2, n)
                mean, log_std = params[:, 0], params[:, 1]
                z = (xg.unsqueeze(-1).to(mean.dtype) - mean) * torch.exp(-log_std)
                value = -0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)
                marginal = semiring.gaussian_no_evidence(log_std).unsqueeze(0)
            else:
                k = bucket["num_cats"]
                table = tables[bucket["key"]]  # (banks, n, K)
                idx = xg.long().clamp(0, k - 1)
                if bucket["shared"] is not None:
                    value = table[bucket["shared"]].t()[idx]  # (B, G, n)
                else:
                    value = _categorical_rows(table, getattr(self, f"bank_{i}"), idx)
                if isinstance(evidence, TopKEvidence):
                    value, marginal = self._topk_values(i, bucket, tables, value, idx, var, missing, evidence, semiring)
                else:
                    ev = None
                    if evidence is not None:
                        ev = evidence.index_select(1, var)[:, :, :k]
                        value = value + torch.gather(ev, 2, idx.unsqueeze(-1))
                    marginal = None
                    if missing is not None:
                        shared_table = self._tables(i, bucket, tables, broadcast=True)
                        marginal = semiring.sum_dense(ev, shared_table) if ev is not None else semiring.no_evidence(shared_table).unsqueeze(0)
            if missing is not None:
                value = torch.where(missing.index_select(1, var).unsqueeze(-1), marginal, value)
            outs.append(value.flatten(1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _topk_values(self, i: int, bucket: dict, tables: dict[str, torch.Tensor], value: torch.Tensor,
                     idx: torch.Tensor, var: torch.Tensor, missing: torch.Tensor | None, evidence: TopKEvidence,
                     semiring: Semiring) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Observed values (B, G, n) times their top-k weight, and the summed-out values
        (B, G|1, n) under top-k evidence (None when nothing is missing)."""
        values = evidence.values.index_select(1, var)
        indices = evidence.indices.index_select(1, var)
        free = evidence.free.index_select(1, var) if evidence.free is not None else None
        match = indices == idx.unsqueeze(-1)  # (B, G, k): at most one candidate equals the value
        weight = torch.where(match, values, torch.zeros_like(values)).sum(-1)
        weight = torch.where(match.any(-1), weight, torch.full_like(weight, -torch.inf))
        if free is not None:
            weight = torch.where(free, torch.zeros_like(weight), weight)
        value = value + weight.unsqueeze(-1)
        if missing is None:
            return value, None
        shared_table = self._tables(i, bucket, tables, broadcast=True)
        marginal = semiring.topk_evidence(values, indices, shared_table)
        if free is not None and bool((free & missing.index_select(1, var)).any()):  # skip a pass over the table when unused
            marginal = torch.where(free.unsqueeze(-1), semiring.no_evidence(shared_table).unsqueeze(0), marginal)
        return value, marginal

    def emit(self, active: torch.Tensor, tables: dict[str, torch.Tensor], x: torch.Tensor,
             missing: torch.Tensor | None, evidence: torch.Tensor | None, chooser: Chooser,
             uniforms: torch.Tensor | None, normals: Callable[[int], torch.Tensor] | None,
             num_cats: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values of the active input nodes (one per sample and variable).

        Returns ``(x_out (B, V), node (B, V) active input node index, node_log_probs (B, V, K))``;
        observed entries of ``x`` are kept, missing ones drawn by ``chooser``.
        """
        batch, num_vars = x.shape
        x_out = x.clone()
        node = torch.full((batch, num_vars), -1, dtype=torch.long, device=x.device)
        dtype = next(iter(tables.values())).dtype
        node_logp = torch.full((batch, num_vars, max(num_cats, 1)), -torch.inf, dtype=dtype, device=x.device)
        start = 0
        for i, bucket in enumerate(self.buckets):
            var_of_group = getattr(self, f"var_{i}")
            n = bucket["num_nodes"]
            size = var_of_group.numel() * n
            b, flat = active[:, start:start + size].nonzero(as_tuple=True)
            g, j = flat // n, flat % n
            var = var_of_group[g]
            bank = getattr(self, f"bank_{i}")[g]
            node[b, var] = start + flat
            draw = missing[b, var] if missing is not None else torch.zeros_like(b, dtype=torch.bool)
            u = uniforms[b, start + flat] if uniforms is not None else None
            if bucket["kind"] == "gaussian":
                params = tables[bucket["key"]][bank]  # (A, 2, n)
                mean = params[torch.arange(len(j)), 0, j]
                std = torch.exp(params[torch.arange(len(j)), 1, j])
                value = mean if normals is None else mean + std * normals(len(j)).to(mean.dtype)
                x_out[b, var] = torch.where(draw, value.to(x_out.dtype), x_out[b, var])
            else:
                k = bucket["num_cats"]
                logp = tables[bucket["key"]][bank, j]  # (A, K)
                node_logp[b, var, :k] = logp
                if isinstance(evidence, TopKEvidence):
                    _emit_topk(x_out, b, var, draw, logp, evidence, chooser, u)
                else:
                    logits = logp + evidence[b, var, :k] if evidence is not None else logp
                    if bool(draw.any()):
                        chosen = chooser(logits[draw], None if u is None else u[draw])
                        x_out[b[draw], var[draw]] = chosen.to(x_out.dtype)
            start += size
        return x_out, node, node_logp


def _emit_topk(x_out: torch.Tensor, b: torch.Tensor, var: torch.Tensor, draw: torch.Tensor, logp: torch.Tensor,
               evidence: TopKEvidence, chooser: Chooser, u: torch.Tensor | None) -> None:
    """Draw the missing values of active categorical inputs under top-k evidence into ``x_out``:
    among the k candidates (sorted by category, so inverse-CDF draws match the dense
    evidence's), or among all categories where the variable is ``free``.

    ``b``, ``var``, ``draw`` (A,) and ``logp`` (A, K) describe the active inputs; ``u`` (A,) uniforms or None."""
    free = evidence.free[b, var] if evidence.free is not None else torch.zeros_like(draw)
    for rows, sparse in ((draw & ~free, True), (draw & free, False)):
        if not bool(rows.any()):
            continue
        u_rows = None if u is None else u[rows]
        if sparse:
            candidates = evidence.indices[b[rows], var[rows]]  # (R, k)
            logits = logp[rows].gather(1, candidates) + evidence.values[b[rows], var[rows]]
            chosen = candidates.gather(1, chooser(logits, u_rows).unsqueeze(1)).squeeze(1)
        else:
            chosen = chooser(logp[rows], u_rows)
        x_out[b[rows], var[rows]] = chosen.to(x_out.dtype)


def _outer_structure(child_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Detect products of two children laid out as G blocks of cross products.

    Returns ``(left (G, S1), right (G, S2))`` with ``child_index[(g*S1 + i)*S2 + j] ==
    (left[g, i], right[g, j])``, or None. Such a layer (RAT-SPN and Tucker-style region
    products) is a broadcast sum ``z[left][..., None] + z[right][..., None, :]``.
    """
    first, second = child_index[:, 0], child_index[:, 1]
    num = first.numel()
    s2 = int((first != first[0]).nonzero()[0]) if bool((first != first[0]).any()) else num
    if s2 < 2 or num % s2:
        return None
    rows = first.view(-1, s2)
    if not bool((rows == rows[:, :1]).all()):
        return None
    right_rows = second.view(-1, s2)
    differs = (right_rows != right_rows[0]).any(1)
    s1 = int(differs.nonzero()[0]) if bool(differs.any()) else right_rows.shape[0]
    if s1 < 2 or right_rows.shape[0] % s1:
        return None
    blocks = right_rows.view(-1, s1, s2)
    if not bool((blocks == blocks[:, :1]).all()):
        return None
    return rows[:, 0].view(-1, s1), blocks[:, 0]


def _block_stride(blocks: torch.Tensor) -> tuple[int, int] | None:
    """``(start, step)`` when ``blocks`` (G, S) is ``start + g * step + s`` (every group a run
    of S consecutive positions, groups ``step`` apart), else None."""
    groups, size = blocks.shape
    start = int(blocks[0, 0])
    step = int(blocks[1, 0]) - start if groups > 1 else size
    expected = start + step * torch.arange(groups)[:, None] + torch.arange(size)[None, :]
    return (start, step) if step >= size and torch.equal(blocks.cpu(), expected) else None


class ProductLayer(_GatherMixin):
    """Products as gather-and-add: (B, M) -> (B, P) summing ``F`` gathered children."""

    def __init__(self, spec: dict):
        super().__init__()
        self._init_sources(spec["sources"])
        _register(self, "child_index", spec["children"])
        self.padded = bool(spec["padded"])
        self.num_nodes = spec["children"].shape[0]
        self.column_reads = None if self.padded else self._column_reads()
        # Per child column: the start of a contiguous run of z (read as a view), else None.
        self.child_starts = [_contiguous_start(self.child_index[:, f]) for f in range(self.child_index.shape[1])]
        self.outer = None
        self.outer_strides: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)
        if self.column_reads is None and not self.padded and self.child_index.shape[1] == 2:
            self.outer = _outer_structure(self.child_index)
            if self.outer is not None:
                _register(self, "outer_left", self.outer[0].reshape(-1))
                _register(self, "outer_right", self.outer[1].reshape(-1))
                self.outer_strides = (_block_stride(self.outer[0]), _block_stride(self.outer[1]))

    def _column_reads(self) -> list[tuple[int, int, int]] | None:
        """(layer, start, length) per child column when every column of ``child_index`` is a
        contiguous run inside one contiguous source segment: the product is then a plain
        sum of column ranges of earlier outputs, with no gather and no index_select."""
        reads = []
        for f in range(self.child_index.shape[1]):
            first = _contiguous_start(self.child_index[:, f])
            if first is None:
                return None
            offset = 0
            for i, (layer, span) in enumerate(zip(self.source_layers, self.source_ranges)):
                length = getattr(self, f"source_{i}").numel()
                if span is not None and offset <= first and first + self.num_nodes <= offset + length:
                    reads.append((layer, span[0] + first - offset, self.num_nodes))
                    break
                offset += length
            else:
                return None
        return reads

    def reads(self) -> list[tuple[int, int, int]]:
        return self.column_reads if self.column_reads is not None else super().reads()

    def forward(self, outputs: list[torch.Tensor], semiring: Semiring) -> torch.Tensor:
        if self.column_reads is not None:
            parts = [read_columns(outputs, *read) for read in self.column_reads]
            out = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
            for part in parts[2:]:
                out += part
            return out
        z = self.gather(outputs)
        if self.outer is not None:  # blocks of cross products: one broadcast add, no big gathers
            groups, left, right = self.outer[0].shape[0], self.outer[0].shape[1], self.outer[1].shape[1]
            a = z.index_select(1, self.outer_left).view(-1, groups, left, 1)
            b = z.index_select(1, self.outer_right).view(-1, groups, 1, right)
            return (a + b).view(z.shape[0], -1)
        if self.padded:
            z = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)
        out = self.child_column(z, 0)
        for f in range(1, self.child_index.shape[1]):
            out = out + self.child_column(z, f)
        return out

    def child_column(self, z: torch.Tensor, f: int) -> torch.Tensor:
        """(B, P) values of every product's ``f``-th child from the gathered ``z`` (B, M): a
        view where those children are a contiguous run of ``z``, else a gather."""
        start = self.child_starts[f]
        if start is not None:
            return z.narrow(1, start, self.num_nodes)
        return z.index_select(1, self.child_index[:, f])

    def select(self, active: torch.Tensor, outputs: list[torch.Tensor], params: dict, chooser: Chooser,
               uniforms: torch.Tensor | None) -> torch.Tensor:
        """Active positions of ``z`` (B, M): every child of an active product is active."""
        active_z = active.new_zeros(active.shape[0], self.width + 1)
        # Several products may share a child: assign True (never copy masks) so no write is lost.
        b, j = active.nonzero(as_tuple=True)
        active_z[b[:, None], self.child_index[j]] = True
        return active_z[:, : self.width]


class SumLayer(_GatherMixin):
    """Sums: per dense bucket one batched matrix product; per sparse group a padded logsumexp."""

    def __init__(self, spec: dict):
        super().__init__()
        self._init_sources(spec["sources"])
        self.dense = []
        for i, bucket in enumerate(spec["dense"]):
            _register(self, f"dense_children_{i}", bucket["children"])
            _register(self, f"dense_bank_{i}", bucket["group_bank"])
            bank = bucket["group_bank"]
            shared = int(bank[0]) if bool((bank == bank[0]).all()) else None
            groups, child_count = bucket["children"].shape
            self.dense.append({"key": bucket["key"], "shared": shared, "groups": groups, "child_count": child_count,
                               "start": _contiguous_start(bucket["children"].reshape(-1)),
                               "bank_start": _contiguous_start(bank)})
        self.sparse = []
        for i, bucket in enumerate(spec["sparse"]):
            _register(self, f"sparse_children_{i}", bucket["children"])
            self.sparse.append({"key": bucket["key"]})

    def single_banks(self) -> set[tuple[str, int]]:
        """(key, bank) of the dense buckets whose groups all use one weight bank."""
        return {(spec["key"], spec["shared"]) for spec in self.dense if spec["shared"] is not None}

    def _dense_logw(self, i: int, logweights: dict[str, torch.Tensor], broadcast: bool) -> torch.Tensor:
        spec = self.dense[i]
        table = logweights[spec["key"]]
        if spec["shared"] is not None and broadcast:
            view = logweights.get((spec["key"], spec["shared"]))  # type: ignore[call-overload]
            return (table[spec["shared"]] if view is None else view).unsqueeze(0)
        if spec["bank_start"] is not None:  # consecutive banks: a view (its backward is a slice, not a scatter)
            return table.narrow(0, spec["bank_start"], spec["groups"])
        return table.index_select(0, getattr(self, f"dense_bank_{i}"))

    def _dense_inputs(self, i: int, z: torch.Tensor) -> torch.Tensor:
        spec = self.dense[i]
        width = spec["groups"] * spec["child_count"]
        if spec["start"] == 0 and width == z.shape[1]:  # children are all of z
            return z.view(z.shape[0], spec["groups"], spec["child_count"])
        if spec["start"] is not None:  # children are a contiguous run of z: a view, no copy
            return z.narrow(1, spec["start"], width).view(
                z.shape[0], spec["groups"], spec["child_count"])
        return z.index_select(1, getattr(self, f"dense_children_{i}").reshape(-1)).view(z.shape[0], spec["groups"], spec["child_count"])

    def _padded_z(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, z.new_full((z.shape[0], 1), -torch.inf)], dim=1)

    def forward(self, outputs: list[torch.Tensor], logweights: dict[str, torch.Tensor], semiring: Semiring) -> torch.Tensor:
        """``logweights`` maps bank keys to normalised log-weights (banks, N, C) or (N, F)."""
        z = self.gather(outputs)
        outs = []
        for i in range(len(self.dense)):
            x = self._dense_inputs(i, z)
            outs.append(semiring.sum_dense(x, self._dense_logw(i, logweights, True)).flatten(1))
        if self.sparse:
            zp = self._padded_z(z)
            for i, spec in enumerate(self.sparse):
                children = getattr(self, f"sparse_children_{i}")
                a = zp.index_select(1, children.reshape(-1)).view(z.shape[0], *children.shape) + logweights[spec["key"]]
                outs.append(semiring.sum_padded(a))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def select(self, active: torch.Tensor, outputs: list[torch.Tensor], logweights: dict[str, torch.Tensor],
               chooser: Chooser, uniforms: torch.Tensor | None) -> torch.Tensor:
        """Active positions of ``z`` (B, M): each active sum node picks one child with
        probability proportional to weight times child value (or the best one for MPE)."""
        z = self.gather(outputs)
        batch = z.shape[0]
        active_z = active.new_zeros(batch, self.width + 1)
        start = 0
        for i, spec in enumerate(self.dense):
            x = self._dense_inputs(i, z)
            logw = self._dense_logw(i, logweights, False)
            n = logw.shape[1]
            size = spec["groups"] * n
            b, flat = active[:, start:start + size].nonzero(as_tuple=True)
            g, j = flat // n, flat % n
            logits = logw[g, j] + x[b, g]
            u = uniforms[b, start + flat] if uniforms is not None else None
            chosen = chooser(logits, u)
            active_z[b, getattr(self, f"dense_children_{i}")[g, chosen]] = True
            start += size
        if self.sparse:
            zp = self._padded_z(z)
            for i, spec in enumerate(self.sparse):
                children = getattr(self, f"sparse_children_{i}")
                size = children.shape[0]
                b, j = active[:, start:start + size].nonzero(as_tuple=True)
                logits = logweights[spec["key"]][j] + zp[b[:, None], children[j]]
                u = uniforms[b, start + j] if uniforms is not None else None
                chosen = chooser(logits, u)
                active_z[b, children[j, chosen]] = True
                start += size
        return active_z[:, : self.width]
