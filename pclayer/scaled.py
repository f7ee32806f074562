"""Root log-likelihoods in scaled linear space: products multiply, sums are plain matrix products.

The log-space program (:meth:`pclayer.TensorCircuit.layer_values`) pays an ``exp`` before and
a ``log`` after the matrix product of every sum layer. Here every layer output is a pair
``(p, c)``: probabilities ``p`` (B, n_layer) with ``0 <= p <= 1`` and a per-row log-scale
``c`` (B, 1), so the log-value is ``log(p) + c``. Inputs are exponentiated once, products
multiply, sums multiply by ``exp(log-weights)``, rows are renormalised by their maximum only
when a layer's smallest entry gets small, and the only ``log`` is taken at the root.

Exactness: the path is used only when every entry of every layer output is at least
:data:`SAFE_FLOOR` (absolute; all probabilities are at most 1, so no partial product
underflowed and the terms a sum lost are far below its precision), the guarantee that
:func:`pclayer.ops.log_matmul_exp.log_matmul_exp` checks before it trusts its fast product.
A proven lower bound (products of the factors' bounds, the smallest table entry) skips the
measurement where it suffices. Exact zeros (indicator inputs, pruned edges) therefore also
go to the log-space program. Otherwise :func:`scaled_root_value` returns None and the caller runs the log-space program,
which recomputes the affected rows exactly. Gradients flow through ordinary autograd; the
scales are constants (the value ``log(p) + c`` does not depend on them), so the gradient is
exactly that of the log-space program.
"""

from __future__ import annotations

import threading

import torch

from pclayer.layers import InputLayer, LayerOutputs, ProductLayer, SumLayer, read_columns
from pclayer.semiring import LOG_SUM

SAFE_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-20, torch.float32: 1e-30, torch.float64: 1e-290}
"""A layer entry below this (absolute) sends the whole batch to the log-space program."""

_RENORMALISE_BELOW = {torch.float16: 1e-2, torch.bfloat16: 1e-10, torch.float32: 1e-10, torch.float64: 1e-100}
"""A layer whose smallest entry falls below this has its rows divided by their maximum."""


class _Workspace:
    """Preallocated layer buffers reused across no-grad calls with the same batch size, dtype,
    device and thread, so that a call writes (``out=``) into memory it has touched before
    instead of paying page faults on fresh allocations. Disabled (every :meth:`take` returns
    None, i.e. ops allocate as usual) whenever gradients are enabled."""

    __slots__ = ("buffers",)

    def __init__(self, buffers: dict | None):
        self.buffers = buffers

    @classmethod
    def for_call(cls, circuit, x: torch.Tensor, dtype: torch.dtype) -> "_Workspace":
        """The circuit's workspace for this call (one per thread; only the latest
        (batch, dtype, device, inference mode) is kept), or a disabled one under autograd."""
        if torch.is_grad_enabled():
            return cls(None)
        key = (x.shape[0], dtype, x.device, torch.is_inference_mode_enabled())
        per_thread = circuit.__dict__.setdefault("_scaled_workspaces", {})
        entry = per_thread.get(threading.get_ident())
        if entry is None or entry[0] != key:
            entry = (key, {})
            per_thread[threading.get_ident()] = entry
        return cls(entry[1])

    def take(self, slot: tuple, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised (shape) buffer of ``like``'s dtype and device for ``slot`` (one slot per
        layer output: a buffer is never read after the next call starts), or None when disabled."""
        if self.buffers is None:
            return None
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype:
            buffer = like.new_empty(shape)
            self.buffers[slot] = buffer
        return buffer


class _Scaled:
    """One layer output: probabilities ``p`` (B, n), log-scale ``c`` (B, 1) (None = 0) and a
    lower bound ``low`` on every entry of ``p`` (all entries are at least :data:`SAFE_FLOOR`)."""

    __slots__ = ("p", "c", "low")

    def __init__(self, p: torch.Tensor, c: torch.Tensor | None, low: float):
        self.p, self.c, self.low = p, c, low


class _Outputs:
    """Layer outputs so far: probabilities in a :class:`LayerOutputs` (split once where later
    layers read several column ranges, as in the log-space program), scales and lower bounds."""

    def __init__(self, cuts: dict[int, list[int]]):
        self.probs = LayerOutputs(cuts)
        self.scales: list[torch.Tensor | None] = []
        self.lows: list[float] = []

    def add(self, out: _Scaled) -> None:
        self.probs.add(out.p)
        self.scales.append(out.c)
        self.lows.append(out.low)


def _add_scales(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _checked(p: torch.Tensor, c: torch.Tensor | None, low: float, owned: bool = False) -> _Scaled | None:
    """Accept a layer output whose entries are all at least the floor (``low`` is a proven
    lower bound, measured only when it does not settle the question), dividing its rows by
    their maximum when its smallest entry gets small. None = not exact in linear space.

    Every factor of a product and every term of a sum is at most 1, so an entry at least the
    floor had no partial result underflow (products) or only dropped terms far below its own
    precision (sums): the guarantee :func:`pclayer.ops.log_matmul_exp.log_matmul_exp` checks.
    ``owned``: ``p`` is a workspace buffer of this layer, so it may be divided in place."""
    floor, renormalise_below = SAFE_FLOOR[p.dtype], _RENORMALISE_BELOW[p.dtype]
    if low < renormalise_below and p.numel():
        low = float(p.detach().amin())
        if not low >= floor:  # also catches NaN
            return None
        if low < renormalise_below:
            top = p.detach().amax(1, keepdim=True)
            return _Scaled(p.div_(top) if owned else p / top, _add_scales(c, top.log()), low)
    return _Scaled(p, c, low)


def _common_scale(outputs: _Outputs, layers: list[int]) -> tuple[torch.Tensor | None, dict[int, torch.Tensor | None], float]:
    """A common log-scale for reading ``layers`` together, each layer's factor to reach it
    (``exp(c_l - c) <= 1``; None = no rescaling) and a lower bound of the rescaled entries."""
    scales = {layer: outputs.scales[layer] for layer in set(layers)}
    distinct = {id(c): c for c in scales.values()}
    if len(distinct) == 1:
        return next(iter(distinct.values())), {layer: None for layer in scales}, min(outputs.lows[l] for l in scales)
    filled = [torch.zeros_like(next(c for c in distinct.values() if c is not None)) if c is None else c
              for c in distinct.values()]
    common = torch.stack(filled).amax(0)
    factors = {layer: torch.exp((torch.zeros_like(common) if c is None else c) - common) for layer, c in scales.items()}
    low = min(outputs.lows[layer] * float(factors[layer].amin()) for layer in scales)
    return common, factors, low


def _gather(layer, outputs: _Outputs) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Linear-space counterpart of ``_GatherMixin.gather``: (B, M) probabilities at one common
    scale, the scale, and a lower bound of the entries."""
    common, factors, low = _common_scale(outputs, layer.source_layers)
    probs = outputs.probs
    parts = []
    for i, source in enumerate(layer.source_layers):
        span = layer.source_ranges[i]
        if span is not None:
            part = read_columns(probs, source, span[0], span[1])
        else:
            part = probs[source].index_select(1, getattr(layer, f"source_{i}"))
        factor = factors[source]
        parts.append(part if factor is None else part * factor)
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), common, low


def _multiply(parts: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise product of ``parts`` (at least two when ``out``, a buffer, is given)."""
    if len(parts) == 1:
        return parts[0]
    result = torch.mul(parts[0], parts[1], out=out)
    for part in parts[2:]:
        result = result.mul_(part) if out is not None else result * part
    return result


def _product(layer: ProductLayer, outputs: _Outputs, workspace: _Workspace, slot: int) -> _Scaled | None:
    if layer.column_reads is not None:
        parts = [read_columns(outputs.probs, *read) for read in layer.column_reads]
        scale, low = None, 1.0
        for source, _, _ in layer.column_reads:
            scale = _add_scales(scale, outputs.scales[source])
            low *= outputs.lows[source]
        out = workspace.take((slot,), parts[0].shape, parts[0]) if len(parts) > 1 else None
        result = _checked(_multiply(parts, out), scale, low, owned=out is not None)
        if result is None:  # small factors: bring each factor's largest entry per row to 1 first
            tops = [part.detach().amax(1, keepdim=True) for part in parts]
            tops = [torch.where(top > 0, top, torch.ones_like(top)) for top in tops]
            for top in tops:
                scale = _add_scales(scale, top.log())
            result = _checked(_multiply([part / top for part, top in zip(parts, tops)]), scale, 0.0)
        return result
    if layer.padded:  # a padded child would need the factor exp(-c): left to the log-space program
        return None
    z, common, low = _gather(layer, outputs)
    fan_in = layer.child_index.shape[1]
    if low ** fan_in < _RENORMALISE_BELOW[z.dtype]:  # many small factors: first bring each row's largest to 1
        top = z.detach().amax(1, keepdim=True)
        top = torch.where(top > 0, top, torch.ones_like(top))
        z, common, low = z / top, _add_scales(common, top.log()), 0.0
    scale = None if common is None else common * fan_in
    if layer.outer is not None:
        groups, left, right = layer.outer[0].shape[0], layer.outer[0].shape[1], layer.outer[1].shape[1]
        a = z.index_select(1, layer.outer_left).view(-1, groups, left, 1)
        b = z.index_select(1, layer.outer_right).view(-1, groups, 1, right)
        return _checked((a * b).view(z.shape[0], -1), scale, low * low)
    return _checked(_multiply([layer.child_column(z, f) for f in range(fan_in)]), scale, low ** fan_in)


_FUSED_CHUNK_ELEMENTS = 1 << 20
"""Cross products are formed this many elements at a time (a few MB: stays in cache and
below the allocator's mmap threshold, so no page faults per call)."""


def _fusable_cross_products(circuit) -> set[int]:
    """Indices of cross-product layers (see ``_outer_structure``) read only by the next layer,
    a sum layer with one dense bucket whose groups are exactly the product's blocks (Tucker
    layers, RAT-SPN): those pairs run as one fused step. Computed once per circuit."""
    cached = circuit.__dict__.get("_fusable_cross_products")
    if cached is not None:
        return cached
    readers: dict[int, set[int]] = {}
    for i, layer in enumerate(circuit.layers[1:], start=1):
        for source in layer.source_layers:
            readers.setdefault(source, set()).add(i)
    fusable = set()
    for i, layer in enumerate(circuit.layers[:-1]):
        after = circuit.layers[i + 1]
        if not (isinstance(layer, ProductLayer) and layer.outer is not None and isinstance(after, SumLayer)):
            continue
        groups, left, right = layer.outer[0].shape[0], layer.outer[0].shape[1], layer.outer[1].shape[1]
        if (readers.get(i) == {i + 1} and i != circuit.root[0] and after.source_layers == [i]
                and after.source_ranges == [(0, layer.num_nodes)] and not after.sparse and len(after.dense) == 1
                and after.dense[0]["start"] == 0 and after.dense[0]["groups"] == groups
                and after.dense[0]["child_count"] == left * right):
            fusable.add(i)
    circuit.__dict__["_fusable_cross_products"] = fusable
    return fusable


def _cross_product_sum(circuit, product: ProductLayer, layer: SumLayer, outputs: _Outputs, tables: dict) -> _Scaled | None:
    """The sum layer over a cross-product layer without materialising all cross products:
    per chunk of groups ``(a (x) b)`` then its matrix product with the weights. None when the
    factors' lower bound cannot prove that no cross product underflows (then both layers run
    separately)."""
    z, common, low = _gather(product, outputs)
    if not low * low >= SAFE_FLOOR[z.dtype]:
        return None
    groups, left, right = product.outer[0].shape[0], product.outer[0].shape[1], product.outer[1].shape[1]
    batch = z.shape[0]
    # group-major factors (G, B, S): each chunk of groups is contiguous and is the batch of a bmm
    a = z.index_select(1, product.outer_left).view(batch, groups, left).transpose(0, 1).contiguous().unsqueeze(-1)
    b = z.index_select(1, product.outer_right).view(batch, groups, right).transpose(0, 1).contiguous().unsqueeze(-2)
    w = _dense_weights(circuit, layer, 0, tables)  # (G|1, N, left*right)
    step = max(1, _FUSED_CHUNK_ELEMENTS // max(batch * left * right, 1))
    sums = []
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        x = (a[g0:g1] * b[g0:g1]).view(g1 - g0, batch, left * right)
        if w.shape[0] == 1:
            sums.append((x.view(-1, left * right) @ w[0].transpose(0, 1)).view(g1 - g0, batch, -1))
        else:
            sums.append(torch.bmm(x, w[g0:g1].transpose(1, 2)))
    s = (sums[0] if len(sums) == 1 else torch.cat(sums, dim=0)).transpose(0, 1)  # (B, G, N)
    return _checked(s.reshape(batch, -1), None if common is None else common * 2, 0.0)


def _dense_weights(circuit, layer: SumLayer, i: int, tables: dict) -> torch.Tensor:
    """(G|1, N, C) linear weights of dense bucket ``i`` of ``layer``."""
    spec = layer.dense[i]
    table = tables[spec["key"]]
    if table.requires_grad:
        return torch.exp(layer._dense_logw(i, tables, True))
    linear, _ = _linear_table(circuit, spec["key"], table, rows_layout=False)
    return layer._dense_logw(i, {spec["key"]: linear}, True)


def _sum(circuit, layer: SumLayer, outputs: _Outputs, tables: dict, workspace: _Workspace, slot: int) -> _Scaled | None:
    z, common, _ = _gather(layer, outputs)
    outs = []
    alone = len(layer.dense) == 1 and not layer.sparse  # the matrix product is the layer output
    owned = False
    for i in range(len(layer.dense)):
        x = layer._dense_inputs(i, z)
        w = _dense_weights(circuit, layer, i, tables)
        b, g, c = x.shape
        if w.shape[0] == 1:
            out = workspace.take((slot, i), (b * g, w.shape[1]), x) if alone else None
            s = torch.mm(x.reshape(b * g, c), w[0].transpose(0, 1), out=out).view(b, g * w.shape[1])
            owned = out is not None
        else:
            s = torch.bmm(x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1).reshape(b, -1)
        outs.append(s)
    if layer.sparse:
        zp = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)
        for i, spec in enumerate(layer.sparse):
            children = getattr(layer, f"sparse_children_{i}")
            a = zp.index_select(1, children.reshape(-1)).view(z.shape[0], *children.shape)
            outs.append((a * _linear_table(circuit, spec["key"], tables[spec["key"]], rows_layout=False)[0]).sum(-1))
    s = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return _checked(s, common, 0.0, owned=owned)


def _linear_table(circuit, key, table: torch.Tensor, rows_layout: bool) -> tuple[torch.Tensor, float]:
    """``exp(table)`` and its smallest entry; for ``rows_layout`` a categorical table
    (banks, n, K) is returned as (banks*K, n) so that one (bank, category) is one contiguous row.

    Tables that take no part in autograd (for example the cached tables of
    :meth:`TensorCircuit.log_tables` under ``torch.no_grad``) are converted once and reused
    for as long as the same table object comes back."""
    def convert() -> tuple[torch.Tensor, float]:
        linear = torch.exp(table)
        if rows_layout:
            banks, n, k = linear.shape
            linear = linear.transpose(1, 2).reshape(banks * k, n)
        return linear, float(linear.detach().amin()) if linear.numel() else 1.0

    if table.requires_grad:
        return convert()
    cache = circuit.__dict__.setdefault("_linear_table_cache", {})
    entry = cache.get((key, rows_layout))
    if entry is None or entry[0] is not table:
        entry = (table, *convert())
        cache[(key, rows_layout)] = entry
    return entry[1], entry[2]


def _categorical_inputs(circuit, tables: dict, x: torch.Tensor, workspace: _Workspace) -> _Scaled | None:
    """(B, num_input_nodes) probabilities of discrete inputs, fully observed, without evidence:
    one row read per (row, variable) from the linear tables."""
    layer = circuit.layers[0]
    outs, low = [], 1.0
    for i, bucket in enumerate(layer.buckets):
        var, bank = getattr(layer, f"var_{i}"), getattr(layer, f"bank_{i}")
        k, n = bucket["num_cats"], bucket["num_nodes"]
        linear, table_low = _linear_table(circuit, bucket["key"], tables[bucket["key"]], rows_layout=True)
        low = min(low, table_low)
        idx = x.index_select(1, var).long().clamp(0, k - 1)
        rows = (bank * k)[None, :] + idx
        out = workspace.take((0, i), (rows.numel(), n), linear) if len(layer.buckets) == 1 else None
        outs.append(torch.index_select(linear, 0, rows.reshape(-1), out=out).view(x.shape[0], var.numel() * n))
    owned = len(layer.buckets) == 1 and workspace.buffers is not None
    return _checked(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), None, low, owned=owned)


def _tables_are_small(circuit, tables: dict, batch: int) -> bool:
    """Whether every input table is at most twice the size of what a batch reads from it (as in
    the log-space input layer): only then is a linear copy of the tables worth keeping."""
    layer = circuit.layers[0]
    return all(tables[b["key"]].numel() <= 2 * batch * getattr(layer, f"var_{i}").numel() * b["num_nodes"]
               for i, b in enumerate(layer.buckets))


def _inputs(circuit, tables: dict, x: torch.Tensor, missing: torch.Tensor | None, evidence,
            workspace: _Workspace) -> _Scaled | None:
    """Input probabilities; rows are shifted by their maximum unless every log-value is
    known to be <= 0 (discrete inputs without soft evidence)."""
    if evidence is None and missing is None and not circuit.has_gaussian and _tables_are_small(circuit, tables, x.shape[0]):
        return _categorical_inputs(circuit, tables, x, workspace)
    log_values = circuit.layers[0](tables, x, missing, evidence, LOG_SUM)
    if evidence is None and not circuit.has_gaussian:
        return _checked(torch.exp(log_values), None, 0.0)
    top = log_values.detach().amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return _checked(torch.exp(log_values - top), top, 0.0)


def scaled_root_value(circuit, tables: dict, x: torch.Tensor, missing: torch.Tensor | None,
                      evidence) -> torch.Tensor | None:
    """(B,) root log-values computed in scaled linear space, or None where that would not be
    exact (some layer entry below :data:`SAFE_FLOOR`, or a padded product layer, which this
    path leaves to the log-space program). Arguments as in :meth:`TensorCircuit.layer_values` (validated
    inputs, normalised ``tables``, with unbound per-bank views already added)."""
    outputs = _Outputs(circuit.output_cuts)
    workspace = _Workspace.for_call(circuit, x, circuit.dtype)
    fusable = _fusable_cross_products(circuit)
    fused = None
    for i, layer in enumerate(circuit.layers):
        if fused is not None:  # this sum was computed with the cross products before it
            out, fused = fused, None
        elif isinstance(layer, InputLayer):
            out = _inputs(circuit, tables, x, missing, evidence, workspace)
        elif isinstance(layer, SumLayer):
            out = _sum(circuit, layer, outputs, tables, workspace, i)
        elif i in fusable and (fused := _cross_product_sum(circuit, layer, circuit.layers[i + 1], outputs, tables)):
            out = _Scaled(x.new_empty(0, 0, dtype=fused.p.dtype), None, 1.0)  # never read
        else:
            out = _product(layer, outputs, workspace, i)
        if out is None:
            return None
        outputs.add(out)
    layer, index = circuit.root
    p = outputs.probs[layer][:, index]
    c = outputs.scales[layer]
    return p.log() if c is None else p.log() + c.squeeze(1)
