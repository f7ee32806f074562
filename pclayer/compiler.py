"""Compile a symbolic circuit into a typed :class:`~pclayer.plan.Plan`.

Groups are layered by depth (inputs at depth 0, every other group one above its deepest
child). Depth ``d`` becomes a product layer and a sum layer, each reading only from
shallower layers. Inside a layer, node groups are stacked: dense sum groups with the
same (num_nodes, num_children) shape form one bucket (one batched matrix product); input
groups of the same distribution and table shape form one bucket (one gather). Parameter
banks are named by their place in the structure (see :class:`~pclayer.plan.Bank`), never
by object identity, so building the same circuit twice gives the same names.

The plan is plain: the optimisation passes (:mod:`pclayer.passes`) run afterwards.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pclayer.errors import StructureError
from pclayer.nodes import InputGroup, NodeGroup, ProductGroup, SumGroup, topological_order
from pclayer.plan import (Bank, DenseBucket, InputBucket, InputLayerSpec, Plan, ProductLayerSpec, Segment,
                          SparseBucket, SumLayerSpec)


def _levels(order: list[NodeGroup]) -> dict[int, int]:
    level: dict[int, int] = {}
    for group in order:
        level[group.uid] = 0 if not group.children else 1 + max(level[c.uid] for c in group.children)
    return level


class _Banks:
    """Assigns every parameter owner a (bank name, row) slot, stacking equal shapes."""

    def __init__(self) -> None:
        self.slot: dict[int, tuple[str, int]] = {}
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.records: dict[str, Bank] = {}
        self.unstacked: set[str] = set()
        self.positions: dict[int, torch.Tensor] = {}  # sparse owners: flat (node, slot) position per edge

    def add(self, owner_uid: int, bank: Bank, make_value: Callable[[], torch.Tensor], stacked: bool = True) -> tuple[str, int]:
        """The owner's slot; ``make_value`` runs only the first time the owner is seen (tied
        groups share one row and must not recompute it). ``stacked=False``: the bank is the
        value itself (one owner), not a stack of rows."""
        if owner_uid not in self.slot:
            self.slot[owner_uid] = (bank.name, len(self.rows[bank.name]))
            self.rows[bank.name].append(make_value())
            self.records.setdefault(bank.name, bank)
            if not stacked:
                self.unstacked.add(bank.name)
        return self.slot[owner_uid]

    def tensors(self, learnable: bool) -> dict[str, torch.Tensor]:
        return {key: values[0] if key in self.unstacked else torch.stack(values)
                for key, values in self.rows.items() if self.records[key].learnable == learnable}


def _variables(order: list[NodeGroup], root: NodeGroup) -> list[int]:
    num_vars = max(root.scope) + 1
    missing = set(range(num_vars)) - set(root.scope)
    if missing:
        raise StructureError(f"root {root.name!r} must cover variables 0..{num_vars - 1}; it misses {sorted(missing)[:10]}")
    var_cats: dict[int, int] = {}
    for group in order:
        if isinstance(group, InputGroup):
            cats = int(group.dist.num_cats or 0)
            if var_cats.setdefault(group.var, cats) != cats:
                raise StructureError(
                    f"input group {group.name!r}: variable {group.var} has {cats or 'continuous'} categories here "
                    f"but {var_cats[group.var] or 'continuous'} in another input group"
                )
    return [var_cats[v] for v in range(num_vars)]


class _Layout:
    """Where every compiled group's nodes live: uid -> (layer, offset)."""

    def __init__(self) -> None:
        self.where: dict[int, tuple[int, int]] = {}

    def sources(self, groups: list[NodeGroup]) -> tuple[list[Segment], dict[int, int]]:
        """Segments read by a layer and each child group's offset in the gathered vector."""
        children: dict[int, NodeGroup] = {}
        for group in groups:
            for child in group.children:
                children.setdefault(child.uid, child)
        by_layer: dict[int, list[NodeGroup]] = defaultdict(list)
        for child in children.values():
            by_layer[self.where[child.uid][0]].append(child)
        segments: list[Segment] = []
        local: dict[int, int] = {}
        position = 0
        for layer in sorted(by_layer):
            kids = sorted(by_layer[layer], key=lambda c: self.where[c.uid][1])
            index = []
            for child in kids:
                offset = self.where[child.uid][1]
                local[child.uid] = position + len(index)
                index.extend(range(offset, offset + child.num_nodes))
            segments.append(Segment(layer, torch.tensor(index, dtype=torch.long)))
            position += len(index)
        return segments, local


def _input_layer(groups: list[InputGroup], layout: _Layout, banks: _Banks) -> InputLayerSpec:
    buckets: dict[tuple, list[InputGroup]] = defaultdict(list)
    for group in groups:
        engine = group.dist.engine()
        buckets[(type(engine).__name__, group.num_nodes, engine.num_cats or 0)].append(group)
    specs = []
    offset = 0
    for (name, n, k), members in buckets.items():
        rows = []
        for group in members:
            owner = group.param_owner
            engine = owner.dist.engine()
            bank = Bank(engine.bank_key(n), "input", name, learnable=owner.dist.learnable)
            rows.append(banks.add(owner.uid, bank, lambda owner=owner: owner.dist.to_bank(owner.params))[1])
            layout.where[group.uid] = (0, offset)
            offset += n
        specs.append(InputBucket(name, bank.name, n, k, torch.tensor(rows, dtype=torch.long),
                                 torch.tensor([g.var for g in members], dtype=torch.long)))
    return InputLayerSpec(specs)


def _product_layer(groups: list[ProductGroup], layout: _Layout, index: int) -> ProductLayerSpec:
    segments, local = layout.sources(groups)
    width = max(len(g.children) for g in groups)
    pad = sum(len(seg.index) for seg in segments)
    rows = []
    offset = 0
    for group in groups:
        cols = [local[child.uid] + group.edges[:, i] for i, child in enumerate(group.children)]
        block = torch.stack(cols, dim=1)
        if block.shape[1] < width:
            block = torch.cat([block, torch.full((block.shape[0], width - block.shape[1]), pad)], dim=1)
        rows.append(block)
        layout.where[group.uid] = (index, offset)
        offset += group.num_nodes
    return ProductLayerSpec(segments, torch.cat(rows), any(len(g.children) < width for g in groups))


def _sparse_tables(group: SumGroup, positions: torch.Tensor, pad: int) -> tuple[torch.Tensor, ...]:
    """(children (N, F) positions padded with ``pad``, log-weights (N, F), mask (N, F), and
    each edge's flat position in the (N, F) table, in the order the edges were given) of a
    sparse sum group whose child nodes sit at ``positions``."""
    fan_in = torch.bincount(group.edges[0], minlength=group.num_nodes)
    width = int(fan_in.max())
    order = torch.argsort(group.edges[0] * (group.num_child_nodes + 1) + group.edges[1])
    parents, kids = group.edges[0][order], group.edges[1][order]
    rank = torch.arange(len(parents)) - torch.repeat_interleave(torch.cumsum(fan_in, 0) - fan_in, fan_in)
    children = torch.full((group.num_nodes, width), pad, dtype=torch.long)
    children[parents, rank] = positions[kids]
    logits = torch.zeros(group.num_nodes, width, dtype=torch.float64)
    logits[parents, rank] = torch.log(group.param_owner.params[order])
    mask = torch.zeros(group.num_nodes, width, dtype=torch.bool)
    mask[parents, rank] = True
    edge_positions = torch.empty_like(order).index_copy_(0, order, parents * width + rank)
    return children, logits, mask, edge_positions


def _sum_layer(groups: list[SumGroup], layout: _Layout, index: int, banks: _Banks, fixed: _Banks) -> SumLayerSpec:
    segments, local = layout.sources(groups)
    pad = sum(len(seg.index) for seg in segments)

    def child_positions(group: SumGroup) -> torch.Tensor:
        return torch.cat([torch.arange(c.num_nodes) + local[c.uid] for c in group.children])

    dense: dict[tuple[int, int], list[SumGroup]] = defaultdict(list)
    sparse: list[SumGroup] = []
    for group in groups:
        (dense[(group.num_nodes, group.num_child_nodes)] if group.edges is None else sparse).append(group)
    spec = SumLayerSpec(segments, [], [])
    offset = 0
    for (n, c), members in dense.items():
        bank = Bank(f"sum_{n}x{c}", "dense_sum")
        slots = [banks.add(g.param_owner.uid, bank, lambda g=g: torch.log(g.param_owner.params)) for g in members]
        spec.dense.append(DenseBucket(bank.name, torch.stack([child_positions(g) for g in members]),
                                      torch.tensor([s[1] for s in slots], dtype=torch.long)))
        for group in members:
            layout.where[group.uid] = (index, offset)
            offset += n
    for group in sparse:
        owner = group.param_owner
        children, logits, mask, edge_positions = _sparse_tables(group, child_positions(group), pad)
        if owner.uid in banks.slot:  # tied to a sparse group compiled before: same edges, same bank
            key = banks.slot[owner.uid][0]
        else:
            key = f"sparse_{sum(1 for b in banks.records.values() if b.role == 'sparse_sum')}"
            banks.add(owner.uid, Bank(key, "sparse_sum", mask=f"{key}_mask"), lambda: logits, stacked=False)
            banks.positions[owner.uid] = edge_positions
            fixed.add(owner.uid, Bank(f"{key}_mask", "mask", learnable=False), lambda: mask, stacked=False)
        spec.sparse.append(SparseBucket(key, children))
        layout.where[group.uid] = (index, offset)
        offset += group.num_nodes
    return spec


@dataclass(frozen=True)
class ParamSlot:
    """Where a parameter owner's values live in the compiled circuit.

    The owner's normalised log-parameters, in the layout of its symbolic group, are
    ``tables[key][bank]`` (``tables[key]`` when ``bank`` is None), flattened and read at
    ``positions`` when that is not None (one position per sparse edge, in edge order), with
    ``tables`` the normalised tables of :meth:`pclayer.TensorCircuit.log_tables`.
    """

    key: str
    bank: int | None
    positions: torch.Tensor | None


def parameter_slots(root: NodeGroup) -> dict[int, ParamSlot]:
    """The :class:`ParamSlot` of every parameter owner (input group, sum group) of the circuit
    rooted at ``root``, by owner ``uid``: the slots :func:`build_plan` assigns."""
    _, banks, fixed = _build(root)
    slots = {}
    for table in (banks, fixed):
        for uid, (key, row) in table.slot.items():
            if table.records[key].role == "mask":
                continue
            stacked = key not in table.unstacked
            slots[uid] = ParamSlot(key, row if stacked else None, banks.positions.get(uid))
    return slots


def build_plan(root: NodeGroup) -> Plan:
    """Compile the circuit rooted at ``root`` (one node) into a plain :class:`Plan`."""
    return _build(root)[0]


def _build(root: NodeGroup) -> tuple[Plan, _Banks, _Banks]:
    if not isinstance(root, NodeGroup):
        raise TypeError(f"root: expected a node group, got {type(root).__name__}")
    if root.num_nodes != 1:
        raise StructureError(f"root: the root group {root.name!r} must have exactly one node, got {root.num_nodes}")
    order = topological_order(root)
    var_cats = _variables(order, root)
    level = _levels(order)
    by_level: dict[int, list[NodeGroup]] = defaultdict(list)
    for group in order:
        by_level[level[group.uid]].append(group)
    layout, banks, fixed = _Layout(), _Banks(), _Banks()
    layers: list = [_input_layer(by_level[0], layout, banks)]  # type: ignore[arg-type]
    for depth in range(1, max(by_level) + 1):
        products = [g for g in by_level[depth] if isinstance(g, ProductGroup)]
        sums = [g for g in by_level[depth] if isinstance(g, SumGroup)]
        if products:
            layers.append(_product_layer(products, layout, len(layers)))
        if sums:
            layers.append(_sum_layer(sums, layout, len(layers), banks, fixed))
    records = {**banks.records, **fixed.records}
    plan = Plan(
        num_vars=len(var_cats),
        var_cats=var_cats,
        layers=layers,
        root=layout.where[root.uid],
        banks={name: records[name] for name in sorted(records) if records[name].role != "mask"},
        params=banks.tensors(learnable=True),
        fixed={**banks.tensors(learnable=False), **fixed.tensors(learnable=False)},
    )
    return plan, banks, fixed
