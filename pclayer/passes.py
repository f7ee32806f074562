"""Optimisation passes over a :class:`~pclayer.plan.Plan`.

Each pass reads the plain structure and fills the optimisation fields of the layer specs
(``None`` or ``False`` in a plain plan); the program runs every annotated plan to the same
numbers as the plain one, only with fewer copies. :func:`optimize` runs them in order:

1. :func:`contiguous_reads`: index runs that are contiguous become views (segments, product
   child columns read straight from earlier outputs, dense-sum children and bank rows, one
   shared bank broadcast instead of gathered);
2. :func:`cross_products`: two-factor product layers laid out as blocks of cross products
   (RAT-SPN, Tucker) become one broadcast product, with strided reads where evenly spaced;
3. :func:`fuse_cross_product_sums`: such a layer read only by the next sum layer is fused
   with it (the scaled representation then never materialises the cross products);
4. :func:`buffer_liveness`: layers whose outputs are never alive together share one
   workspace buffer.
"""

from __future__ import annotations

import copy

import torch

from pclayer.plan import InputLayerSpec, Plan, ProductLayerSpec, SumLayerSpec


def contiguous_start(index: torch.Tensor) -> int | None:
    """``a`` if ``index`` is ``a, a+1, ..., a+len-1`` (non-empty), else None."""
    if index.numel() == 0:
        return None
    start = int(index[0])
    return start if torch.equal(index, torch.arange(start, start + index.numel(), device=index.device)) else None


def _shared(bank: torch.Tensor) -> int | None:
    return int(bank[0]) if bank.numel() and bool((bank == bank[0]).all()) else None


def _column_reads(spec: ProductLayerSpec) -> list[tuple[int, int, int]] | None:
    """(layer, start, length) per child column when every column of ``children`` is a
    contiguous run inside one contiguous source segment."""
    if spec.padded:
        return None
    num_nodes = spec.children.shape[0]
    reads = []
    for f in range(spec.children.shape[1]):
        first = contiguous_start(spec.children[:, f])
        if first is None:
            return None
        offset = 0
        for segment in spec.sources:
            length = segment.index.numel()
            if segment.span is not None and offset <= first and first + num_nodes <= offset + length:
                reads.append((segment.layer, segment.span[0] + first - offset, num_nodes))
                break
            offset += length
        else:
            return None
    return reads


def contiguous_reads(plan: Plan) -> Plan:
    """Pass 1: mark contiguous index runs (see the module docstring)."""
    for spec in plan.layers:
        if isinstance(spec, InputLayerSpec):
            for bucket in spec.buckets:
                bucket.shared_bank = _shared(bucket.group_bank)
                bucket.var_start = contiguous_start(bucket.group_var)
            continue
        for segment in spec.sources:
            start = contiguous_start(segment.index)
            segment.span = None if start is None else (start, segment.index.numel())
        if isinstance(spec, ProductLayerSpec):
            spec.column_reads = _column_reads(spec)
            spec.child_starts = [contiguous_start(spec.children[:, f]) for f in range(spec.children.shape[1])]
        else:
            for bucket in spec.dense:
                bucket.shared_bank = _shared(bucket.group_bank)
                bucket.children_start = contiguous_start(bucket.children.reshape(-1))
                bucket.bank_start = contiguous_start(bucket.group_bank)
    return plan


def outer_structure(children: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Detect products of two children laid out as G blocks of cross products: returns
    ``(left (G, S1), right (G, S2))`` with ``children[(g*S1 + i)*S2 + j] == (left[g, i],
    right[g, j])``, or None."""
    first, second = children[:, 0], children[:, 1]
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
    return rows[:, 0].view(-1, s1).clone(), blocks[:, 0].clone()


def block_stride(blocks: torch.Tensor) -> tuple[int, int] | None:
    """``(start, step)`` when ``blocks`` (G, S) is ``start + g * step + s``, else None."""
    groups, size = blocks.shape
    start = int(blocks[0, 0])
    step = int(blocks[1, 0]) - start if groups > 1 else size
    expected = start + step * torch.arange(groups)[:, None] + torch.arange(size)[None, :]
    return (start, step) if step >= size and torch.equal(blocks.cpu(), expected) else None


def cross_products(plan: Plan) -> Plan:
    """Pass 2: mark blocks of cross products in two-factor product layers."""
    for spec in plan.layers:
        if isinstance(spec, ProductLayerSpec) and spec.column_reads is None and not spec.padded \
                and spec.children.shape[1] == 2:
            spec.outer = outer_structure(spec.children)
            if spec.outer is not None:
                spec.outer_strides = (block_stride(spec.outer[0]), block_stride(spec.outer[1]))
    return plan


def fuse_cross_product_sums(plan: Plan) -> Plan:
    """Pass 3: fuse a cross-product layer into the next layer when that is a sum layer with
    one dense bucket whose groups are exactly the product's blocks and nothing else reads it."""
    readers: dict[int, set[int]] = {}
    for i, spec in enumerate(plan.layers[1:], start=1):
        for segment in spec.sources:
            readers.setdefault(segment.layer, set()).add(i)
    for i, spec in enumerate(plan.layers[:-1]):
        after = plan.layers[i + 1]
        if not (isinstance(spec, ProductLayerSpec) and spec.outer is not None and isinstance(after, SumLayerSpec)):
            continue
        groups, left, right = spec.outer[0].shape[0], spec.outer[0].shape[1], spec.outer[1].shape[1]
        width = spec.children.shape[0]
        if (readers.get(i) == {i + 1} and i != plan.root[0] and [s.layer for s in after.sources] == [i]
                and after.sources[0].span == (0, width) and not after.sparse and len(after.dense) == 1
                and after.dense[0].children_start == 0 and after.dense[0].children.shape == (groups, left * right)):
            after.fused_cross_products = True
    return plan


def buffer_liveness(plan: Plan) -> Plan:
    """Pass 4: workspace buffer id per layer. A layer's buffer is handed to a later layer of
    the same width once every layer that reads it (or reads an output that may be a view of
    it: a product of one factor) has run; the root's buffer is never reused, and a buffer is
    released only after its last reader has been given its own, so no layer writes into
    memory it reads."""
    layers = plan.layers
    holders: list[set[int]] = []
    last_use = list(range(len(layers)))
    for i, spec in enumerate(layers):
        sources = [] if isinstance(spec, InputLayerSpec) else sorted({s.layer for s in spec.sources})
        for source in sources:
            for held in holders[source]:
                last_use[held] = max(last_use[held], i)
        single_factor = isinstance(spec, ProductLayerSpec) and (
            len(spec.column_reads) == 1 if spec.column_reads is not None else spec.children.shape[1] == 1)
        holders.append({i}.union(*(holders[s] for s in sources)) if single_factor else {i})
    for held in holders[plan.root[0]]:
        last_use[held] = len(layers)
    released_after: dict[int, list[int]] = {}
    for held, last in enumerate(last_use):
        released_after.setdefault(last, []).append(held)
    free: dict[int, list[int]] = {}
    slots: list[int] = []
    for i in range(len(layers)):
        width = plan.layer_width(i)
        slots.append(free[width].pop() if free.get(width) else i)
        for held in released_after.get(i, []):
            free.setdefault(plan.layer_width(held), []).append(slots[held])
    plan.buffer_slots = slots
    return plan


PASSES = (contiguous_reads, cross_products, fuse_cross_product_sums, buffer_liveness)


def optimize(plan: Plan) -> Plan:
    """A copy of the plain ``plan`` with every pass of :data:`PASSES` applied (tensors shared)."""
    if plan.optimized:
        return plan
    out = copy.copy(plan)
    out.layers = [copy.deepcopy(spec, memo={id(t): t for t in _tensors(spec)}) for spec in plan.layers]
    for run in PASSES:
        out = run(out)
    out.optimized = True
    return out


def _tensors(spec) -> list[torch.Tensor]:
    """Tensors of a layer spec (shared, not copied, by :func:`optimize`)."""
    found = []
    for value in vars(spec).values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif hasattr(item, "__dataclass_fields__"):
                found.extend(_tensors(item))
    return found
