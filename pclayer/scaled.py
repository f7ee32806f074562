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

import math
import threading

import torch

from pclayer.linear_tables import TableSource
from pclayer.ops.cross_product_sum import cross_product_chunk, cross_product_sum
from pclayer.layers import InputLayer, LayerOutputs, ProductLayer, SumLayer, read_columns
from pclayer.semiring import LOG_SUM

SAFE_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-20, torch.float32: 1e-30, torch.float64: 1e-290}
"""A layer entry below this (absolute) sends the whole batch to the log-space program."""

_CONVEX_SLACK = 0.5
"""Factor applied to a sum's proven lower bound (the smallest child entry) for rounding."""

_RENORMALISE_BELOW = {torch.float16: 1e-2, torch.bfloat16: 1e-10, torch.float32: 1e-10, torch.float64: 1e-100}
"""A layer whose smallest entry falls below this has its rows divided by their maximum."""


class _Workspace:
    """Preallocated layer buffers reused across no-grad calls with the same batch size, dtype,
    device and thread, so that a call writes (``out=``) into memory it has touched before
    instead of paying page faults on fresh allocations. Layers whose outputs are never alive
    at the same time share one buffer (see :func:`_buffer_plan`), which keeps the working set
    small enough to stay in cache. Disabled (every :meth:`take` returns None, i.e. ops
    allocate as usual) whenever gradients are enabled."""

    __slots__ = ("buffers", "plan")

    def __init__(self, buffers: dict | None, plan: list[int] | None):
        self.buffers, self.plan = buffers, plan

    @classmethod
    def for_call(cls, circuit, x: torch.Tensor, dtype: torch.dtype) -> "_Workspace":
        """The circuit's workspace for this call (one per thread; only the latest
        (batch, dtype, device, inference mode) is kept), or a disabled one under autograd."""
        if torch.is_grad_enabled():
            return cls(None, None)
        key = (x.shape[0], dtype, x.device, torch.is_inference_mode_enabled())
        per_thread = circuit.__dict__.setdefault("_scaled_workspaces", {})
        entry = per_thread.get(threading.get_ident())
        if entry is None or entry[0] != key:
            entry = (key, {})
            per_thread[threading.get_ident()] = entry
        return cls(entry[1], _buffer_plan(circuit))

    def scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised (shape) buffer of ``like``'s dtype and device for temporaries that
        live within one layer's computation (shared by every layer that asks for ``name``),
        or None when disabled."""
        if self.buffers is None:
            return None
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            buffer = like.new_empty(numel)
            self.buffers[name] = buffer
        return buffer[:numel].view(shape)

    def take(self, layer: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised (shape) buffer of ``like``'s dtype and device for the output of
        ``layer`` (valid until the last layer that reads it has run), or None when disabled."""
        if self.buffers is None:
            return None
        view = self.buffers.get((layer, shape))  # the view handed out last time
        if view is not None and view.dtype == like.dtype:
            return view
        slot = self.plan[layer]
        numel = math.prod(shape)
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            buffer = like.new_empty(numel)
            self.buffers[slot] = buffer
            for key in [key for key in self.buffers if isinstance(key, tuple) and self.plan[key[0]] == slot]:
                del self.buffers[key]  # views of the replaced buffer
        view = buffer[:numel].view(shape)
        self.buffers[(layer, shape)] = view
        return view


def _buffer_plan(circuit) -> list[int]:
    """Workspace buffer id per layer: a layer's buffer is handed to a later layer of the same
    width once every layer that reads it (or reads an output that may be a view of it: a
    product of one factor) has run; the root's buffer is never reused. Computed once per circuit.

    A buffer is released only after the layer that reads it last has been given its own, so
    no layer ever writes into memory it reads."""
    cached = circuit.__dict__.get("_scaled_buffer_plan")
    if cached is not None:
        return cached
    layers = circuit.layers
    holders: list[set[int]] = []  # per layer: layers whose buffers its output may occupy
    last_use = list(range(len(layers)))
    for i, layer in enumerate(layers):
        sources = [] if isinstance(layer, InputLayer) else sorted(set(layer.source_layers))
        for source in sources:
            for held in holders[source]:
                last_use[held] = max(last_use[held], i)
        single_factor = isinstance(layer, ProductLayer) and (
            len(layer.column_reads) == 1 if layer.column_reads is not None else layer.child_index.shape[1] == 1)
        holders.append({i}.union(*(holders[s] for s in sources)) if single_factor else {i})
    for held in holders[circuit.root[0]]:
        last_use[held] = len(layers)
    released_after: dict[int, list[int]] = {}
    for held, last in enumerate(last_use):
        released_after.setdefault(last, []).append(held)
    free: dict[int, list[int]] = {}
    plan: list[int] = []
    for i in range(len(layers)):
        width = circuit.layer_widths[i]
        plan.append(free[width].pop() if free.get(width) else i)
        for held in released_after.get(i, []):
            free.setdefault(circuit.layer_widths[held], []).append(plan[held])
    circuit.__dict__["_scaled_buffer_plan"] = plan
    return plan


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
    ``owned``: ``p`` is a workspace buffer of this layer, so it may be divided in place. The
    returned bound is measured after renormalising."""
    floor, renormalise_below = SAFE_FLOOR[p.dtype], _RENORMALISE_BELOW[p.dtype]
    if low < renormalise_below and p.numel():
        low = float(p.detach().amin())
        if not low >= floor:  # also catches NaN
            return None
        if low < renormalise_below:
            row_max = p.detach().amax(1, keepdim=True)
            low = float((p.detach().amin(1, keepdim=True) / row_max).min())
            return _Scaled(p.div_(row_max) if owned else p / row_max, _add_scales(c, row_max.log()), low)
    return _Scaled(p, c, low)


def _common_scale(outputs: _Outputs, layers: list[int]) -> tuple[torch.Tensor | None, dict[int, torch.Tensor | None], float]:
    """A common log-scale for reading ``layers`` together, each layer's factor to reach it
    (``exp(c_l - c) <= 1``; None = no rescaling) and a lower bound of the rescaled entries."""
    if len(layers) == 1:
        return outputs.scales[layers[0]], {layers[0]: None}, outputs.lows[layers[0]]
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


def _running_product(parts: list[torch.Tensor], scales: list[torch.Tensor | None], lows: list[float],
                     workspace: _Workspace, slot: int) -> _Scaled | None:
    """Elementwise product of (B, n) factors with scales and lower bounds, multiplied one by
    one into the layer's buffer; the running product is checked (and its rows renormalised)
    before a factor could take its proven bound below the renormalisation threshold, so
    products of many factors (HCLT) need no second pass. None when an entry falls below
    the floor."""
    if len(parts) == 1:
        return _Scaled(parts[0], scales[0], lows[0])
    renormalise_below = _RENORMALISE_BELOW[parts[0].dtype]
    out = workspace.take(slot, parts[0].shape, parts[0])
    result = torch.mul(parts[0], parts[1], out=out)
    scale, low = _add_scales(scales[0], scales[1]), lows[0] * lows[1]
    for part, part_scale, part_low in zip(parts[2:], scales[2:], lows[2:]):
        if low * part_low < renormalise_below:
            checked = _checked(result, scale, low, owned=True)
            if checked is None:
                return None
            result, scale, low = checked.p, checked.c, checked.low
        result = result.mul_(part)
        scale, low = _add_scales(scale, part_scale), low * part_low
    return _checked(result, scale, low, owned=True)


def _product(layer: ProductLayer, outputs: _Outputs, workspace: _Workspace, slot: int) -> _Scaled | None:
    if layer.column_reads is not None:
        parts = [read_columns(outputs.probs, *read) for read in layer.column_reads]
        result = _running_product(parts, [outputs.scales[s] for s, _, _ in layer.column_reads],
                                  [outputs.lows[s] for s, _, _ in layer.column_reads], workspace, slot)
        if result is None:  # small factors: bring each factor's largest entry per row to 1 first
            tops = [part.detach().amax(1, keepdim=True) for part in parts]
            tops = [torch.where(top > 0, top, torch.ones_like(top)) for top in tops]
            scale = None
            for (source, _, _), top in zip(layer.column_reads, tops):
                scale = _add_scales(_add_scales(scale, outputs.scales[source]), top.log())
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


def _cross_product_sum(product: ProductLayer, layer: SumLayer, outputs: _Outputs, source: TableSource,
                       workspace: _Workspace, slot: int) -> _Scaled | None:
    """The sum layer ``slot`` over a cross-product layer without materialising all cross
    products: per chunk of groups ``(a (x) b)`` then its matrix product with the weights, in
    scratch buffers of the workspace when there is one. None when the factors' lower bound
    cannot prove that no cross product underflows (then both layers run separately)."""
    z, common, low = _gather(product, outputs)
    if not low * low >= SAFE_FLOOR[z.dtype]:
        return None
    groups, left, right = product.outer[0].shape[0], product.outer[0].shape[1], product.outer[1].shape[1]
    batch = z.shape[0]
    # group-major factors (G, B, S): each chunk of groups is contiguous and is the batch of a bmm
    a = _group_major(z, product.outer_left, groups, workspace, "left", product.outer_strides[0])
    c = _group_major(z, product.outer_right, groups, workspace, "right", product.outer_strides[1])
    w = _dense_weights(layer, 0, source)  # (left*right, N) or (G, left*right, N)
    n = w.shape[-1]
    chunk = cross_product_chunk(groups, batch, left * right)
    s = cross_product_sum(a, c, w, crosses=workspace.scratch("crosses", (chunk, batch, left, right), z),
                          out=workspace.scratch("sums", (groups, batch, n), z))
    result = workspace.take(slot, (batch, groups * n), z)
    if result is None:
        result = s.transpose(0, 1).reshape(batch, groups * n)
    else:
        result.view(batch, groups, n).copy_(s.transpose(0, 1))
    # each sum is a convex combination of cross products, which are at least low * low
    return _checked(result, None if common is None else common * 2, low * low * _CONVEX_SLACK,
                    owned=workspace.buffers is not None)


def _group_major(z: torch.Tensor, index: torch.Tensor, groups: int, workspace: _Workspace, name: str,
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


def _dense_weights(layer: SumLayer, i: int, source: TableSource) -> torch.Tensor:
    """Linear weights of dense bucket ``i`` of ``layer``, transposed for ``x @ w``: (C, N) when
    every group uses one bank, else (G, C, N)."""
    spec = layer.dense[i]
    if not source.cached:  # exp of the (bank views of the) log-tables, so gradients flow per bank
        w = torch.exp(layer._dense_logw(i, source.log, True)).transpose(1, 2)
        return w[0] if spec["shared"] is not None else w
    if spec["shared"] is not None:
        return source.bank_weights(spec["key"], spec["shared"])
    linear, _ = source.linear(spec["key"])  # (banks, N, C)
    return layer._dense_logw(i, {spec["key"]: linear}, True).transpose(1, 2)


def _dense_sum(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """(B, G*N) sums of one dense bucket: inputs ``x`` (B, G, C), weights ``w`` from
    :func:`_dense_weights`; ``out`` an optional (B, G*N) buffer to write into."""
    b, g, c = x.shape
    if w.dim() == 2:
        return torch.mm(x.reshape(b * g, c) if g > 1 else x.view(b, c), w,
                        out=None if out is None else out.view(b * g, w.shape[1])).view(b, g * w.shape[1])
    n = w.shape[2]
    if out is None:  # one product per group (no transposed copies of x), joined once; unbind
        # keeps autograd from building a full-size zero gradient per group
        return torch.cat([torch.mm(xg, wg) for xg, wg in zip(x.unbind(1), w.unbind(0))], dim=1)
    for group in range(g):  # one product per group, written straight into its column block
        torch.mm(x[:, group], w[group], out=out[:, group * n:(group + 1) * n])
    return out


def _sum(layer: SumLayer, outputs: _Outputs, source: TableSource, workspace: _Workspace, slot: int) -> _Scaled | None:
    z, common, low = _gather(layer, outputs)
    if len(layer.dense) == 1 and not layer.sparse:  # the matrix product is the layer output
        x, w = layer._dense_inputs(0, z), _dense_weights(layer, 0, source)
        out = workspace.take(slot, (x.shape[0], x.shape[1] * w.shape[-1]), z)
        s = _dense_sum(x, w, out)
        owned = out is not None
    else:
        outs = [_dense_sum(layer._dense_inputs(i, z), _dense_weights(layer, i, source), None)
                for i in range(len(layer.dense))]
        if layer.sparse:
            zp = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)
            for i, spec in enumerate(layer.sparse):
                children = getattr(layer, f"sparse_children_{i}")
                a = zp.index_select(1, children.reshape(-1)).view(z.shape[0], *children.shape)
                outs.append((a * source.linear(spec["key"])[0]).sum(-1))
        s, owned = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), False
    # every sum is a convex combination of its children (normalised weights), so it is at least
    # their smallest entry; the slack covers rounding of the weights and of the product
    return _checked(s, common, low * _CONVEX_SLACK, owned=owned)


def _categorical_inputs(circuit, source: TableSource, x: torch.Tensor, workspace: _Workspace) -> _Scaled | None:
    """(B, num_input_nodes) probabilities of discrete inputs, fully observed, without evidence:
    one row read per (row, variable) from the linear tables."""
    layer = circuit.layers[0]
    outs, low = [], 1.0
    for i, bucket in enumerate(layer.buckets):
        var, bank = getattr(layer, f"var_{i}"), getattr(layer, f"bank_{i}")
        k, n = bucket["num_cats"], bucket["num_nodes"]
        linear, table_low = source.linear(bucket["key"], transposed=True)  # (banks, K, n)
        linear = linear.view(-1, n)
        low = min(low, table_low)
        idx = x.index_select(1, var).long().clamp(0, k - 1)
        rows = (bank * k)[None, :] + idx
        out = workspace.take(0, (rows.numel(), n), linear) if len(layer.buckets) == 1 else None
        outs.append(torch.index_select(linear, 0, rows.reshape(-1), out=out).view(x.shape[0], var.numel() * n))
    owned = len(layer.buckets) == 1 and workspace.buffers is not None
    return _checked(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), None, low, owned=owned)


def _tables_are_small(circuit, source: TableSource, batch: int) -> bool:
    """Whether every input table is at most twice the size of what a batch reads from it (as in
    the log-space input layer): only then is a linear copy of the tables worth keeping."""
    layer = circuit.layers[0]
    return all(source.raw_numel(b["key"]) <= 2 * batch * getattr(layer, f"var_{i}").numel() * b["num_nodes"]
               for i, b in enumerate(layer.buckets))


def _inputs(circuit, source: TableSource, x: torch.Tensor, missing: torch.Tensor | None, evidence,
            workspace: _Workspace) -> _Scaled | None:
    """Input probabilities; rows are shifted by their maximum unless every log-value is
    known to be <= 0 (discrete inputs without soft evidence)."""
    if evidence is None and missing is None and not circuit.has_gaussian and _tables_are_small(circuit, source, x.shape[0]):
        return _categorical_inputs(circuit, source, x, workspace)
    log_values = circuit.layers[0](source.log, x, missing, evidence, LOG_SUM)
    if evidence is None and not circuit.has_gaussian:
        return _checked(torch.exp(log_values), None, 0.0)
    top = log_values.detach().amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return _checked(torch.exp(log_values - top), top, 0.0)


def scaled_root_value(circuit, source: TableSource, x: torch.Tensor, missing: torch.Tensor | None,
                      evidence) -> torch.Tensor | None:
    """(B,) root log-values computed in scaled linear space, or None where that would not be
    exact (some layer entry below :data:`SAFE_FLOOR`, or a padded product layer, which this
    path leaves to the log-space program). ``source`` gives the normalised tables (see
    :class:`~pclayer.linear_tables.TableSource`); the other arguments are validated inputs as in
    :meth:`TensorCircuit.layer_values`."""
    outputs = _Outputs(circuit.output_cuts)
    workspace = _Workspace.for_call(circuit, x, circuit.dtype)
    fusable = _fusable_cross_products(circuit)
    fused = None
    for i, layer in enumerate(circuit.layers):
        if fused is not None:  # this sum was computed with the cross products before it
            out, fused = fused, None
        elif isinstance(layer, InputLayer):
            out = _inputs(circuit, source, x, missing, evidence, workspace)
        elif isinstance(layer, SumLayer):
            out = _sum(layer, outputs, source, workspace, i)
        elif i in fusable and (fused := _cross_product_sum(layer, circuit.layers[i + 1], outputs, source, workspace, i + 1)):
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
