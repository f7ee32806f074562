"""Compile a symbolic circuit into a layered tensor program.

Groups are layered by depth (inputs at depth 0, every other group one above its deepest
child). Depth ``d`` becomes a product layer and a sum layer, each reading only from
shallower layers. Inside a layer, node groups are stacked: dense sum groups with the
same (num_nodes, num_children) shape form one batched matrix product; input groups with
the same table shape form one gather. The result is a :class:`Plan`: plain tensors and
integers with no Python objects, which :class:`pclayer.TensorCircuit` runs and which
serialises as is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pclayer.distributions import Gaussian, Indicator
from pclayer.errors import StructureError
from pclayer.nodes import InputGroup, NodeGroup, ProductGroup, SumGroup, topological_order


@dataclass
class Plan:
    """A compiled circuit as plain data.

    Attributes:
        num_vars: number of variables (columns 0..num_vars-1).
        var_cats: (num_vars,) categories per variable, 0 for Gaussian variables.
        layers: one dict per layer, in evaluation order (see ``pclayer.layers``).
        root: (layer, node) of the root node.
        params: learnable tensors by name (log-weights, log-probabilities, Gaussian params).
        fixed: non-learnable tensors by name (indicator tables, sparse-edge masks).
    """

    num_vars: int
    var_cats: list[int]
    layers: list[dict]
    root: tuple[int, int]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)


def _levels(order: list[NodeGroup]) -> dict[int, int]:
    level: dict[int, int] = {}
    for group in order:
        level[group.uid] = 0 if not group.children else 1 + max(level[c.uid] for c in group.children)
    return level


class _Banks:
    """Assigns every parameter owner a (tensor name, index) slot, stacking equal shapes."""

    def __init__(self) -> None:
        self.slot: dict[int, tuple[str, int]] = {}
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.positions: dict[int, torch.Tensor] = {}

    def add(self, owner_uid: int, key: str, make_value: Callable[[], torch.Tensor]) -> tuple[str, int]:
        """The owner's slot; ``make_value`` runs only the first time the owner is seen (tied
        groups share one tensor and must not recompute it)."""
        if owner_uid not in self.slot:
            self.slot[owner_uid] = (key, len(self.rows[key]))
            self.rows[key].append(make_value())
        return self.slot[owner_uid]

    def stacked(self) -> dict[str, torch.Tensor]:
        return {key: torch.stack(values) for key, values in self.rows.items()}


def _variables(order: list[NodeGroup], root: NodeGroup) -> list[int]:
    num_vars = max(root.scope) + 1
    missing = set(range(num_vars)) - set(root.scope)
    if missing:
        raise StructureError(f"root {root.name!r} must cover variables 0..{num_vars - 1}; it misses {sorted(missing)[:10]}")
    var_cats: dict[int, int] = {}
    for group in order:
        if isinstance(group, InputGroup):
            cats = 0 if isinstance(group.dist, Gaussian) else int(group.dist.num_cats)
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
        self.sizes: list[int] = []

    def sources(self, groups: list[NodeGroup]) -> tuple[list[list], dict[int, int]]:
        """Segments read by a layer and each child group's offset in the gathered vector."""
        children: dict[int, NodeGroup] = {}
        for group in groups:
            for child in group.children:
                children.setdefault(child.uid, child)
        by_layer: dict[int, list[NodeGroup]] = defaultdict(list)
        for child in children.values():
            by_layer[self.where[child.uid][0]].append(child)
        segments: list[list] = []
        local: dict[int, int] = {}
        position = 0
        for layer in sorted(by_layer):
            kids = sorted(by_layer[layer], key=lambda c: self.where[c.uid][1])
            index = []
            for child in kids:
                offset = self.where[child.uid][1]
                local[child.uid] = position + len(index)
                index.extend(range(offset, offset + child.num_nodes))
            segments.append([layer, torch.tensor(index, dtype=torch.long)])
            position += len(index)
        return segments, local


def _input_layer(groups: list[InputGroup], layout: _Layout, params: _Banks, fixed: _Banks) -> dict:
    buckets: dict[tuple, list[InputGroup]] = defaultdict(list)
    for group in groups:
        if isinstance(group.dist, Gaussian):
            buckets[("gaussian", group.num_nodes, 0)].append(group)
        elif isinstance(group.dist, Indicator):
            buckets[("indicator", group.num_nodes, group.dist.num_cats)].append(group)
        else:
            buckets[("table", group.num_nodes, group.dist.num_cats)].append(group)
    layer: dict = {"type": "input", "buckets": []}
    offset = 0
    for (kind, n, k), members in buckets.items():
        bank = []
        for group in members:
            owner = group.param_owner
            if kind == "gaussian":
                slot = params.add(owner.uid, f"gauss_{n}",
                                  lambda: torch.stack([owner.params["mean"], torch.log(owner.params["std"])]))
            elif kind == "indicator":
                slot = fixed.add(owner.uid, f"ind_{n}x{k}", lambda: owner.dist.log_table(owner.params))
            else:
                slot = params.add(owner.uid, f"cat_{n}x{k}", lambda: owner.dist.log_table(owner.params))
            bank.append(slot[1])
            layout.where[group.uid] = (0, offset)
            offset += n
        layer["buckets"].append({
            "kind": kind,
            "key": slot[0],
            "num_nodes": n,
            "num_cats": k,
            "group_bank": torch.tensor(bank, dtype=torch.long),
            "group_var": torch.tensor([g.var for g in members], dtype=torch.long),
        })
    layout.sizes.append(offset)
    return layer


def _product_layer(groups: list[ProductGroup], layout: _Layout, index: int) -> dict:
    segments, local = layout.sources(groups)
    width = max(len(g.children) for g in groups)
    pad = sum(len(seg[1]) for seg in segments)
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
    layout.sizes.append(offset)
    return {"type": "product", "sources": segments, "children": torch.cat(rows), "padded": any(len(g.children) < width for g in groups)}


def _sum_layer(groups: list[SumGroup], layout: _Layout, index: int, params: _Banks, fixed: _Banks) -> dict:
    segments, local = layout.sources(groups)
    pad = sum(len(seg[1]) for seg in segments)

    def child_positions(group: SumGroup) -> torch.Tensor:
        return torch.cat([torch.arange(c.num_nodes) + local[c.uid] for c in group.children])

    dense: dict[tuple[int, int], list[SumGroup]] = defaultdict(list)
    sparse: list[SumGroup] = []
    for group in groups:
        (dense[(group.num_nodes, group.num_child_nodes)] if group.edges is None else sparse).append(group)
    layer: dict = {"type": "sum", "sources": segments, "dense": [], "sparse": []}
    offset = 0
    for (n, c), members in dense.items():
        slots = [params.add(g.param_owner.uid, f"sum_{n}x{c}", lambda g=g: torch.log(g.param_owner.params)) for g in members]
        layer["dense"].append({
            "key": slots[0][0],
            "children": torch.stack([child_positions(g) for g in members]),
            "group_bank": torch.tensor([s[1] for s in slots], dtype=torch.long),
        })
        for group in members:
            layout.where[group.uid] = (index, offset)
            offset += n
    for group in sparse:
        owner = group.param_owner
        positions = child_positions(group)
        fan_in = torch.bincount(group.edges[0], minlength=group.num_nodes)
        width = int(fan_in.max())
        order = torch.argsort(group.edges[0] * (group.num_child_nodes + 1) + group.edges[1])
        parents, kids = group.edges[0][order], group.edges[1][order]
        rank = torch.arange(len(parents)) - torch.repeat_interleave(torch.cumsum(fan_in, 0) - fan_in, fan_in)
        children = torch.full((group.num_nodes, width), pad, dtype=torch.long)
        children[parents, rank] = positions[kids]
        logits = torch.zeros(group.num_nodes, width, dtype=torch.float64)
        logits[parents, rank] = torch.log(owner.params[order])
        mask = torch.zeros(group.num_nodes, width, dtype=torch.bool)
        mask[parents, rank] = True
        key, _ = params.add(owner.uid, f"sparse_{owner.uid}", lambda: logits)
        params.positions[owner.uid] = torch.empty_like(order).index_copy_(0, order, parents * width + rank)
        fixed.add(owner.uid, f"{key}_mask", lambda: mask)
        layer["sparse"].append({"key": key, "children": children})
        layout.where[group.uid] = (index, offset)
        offset += group.num_nodes
    layout.sizes.append(offset)
    return layer


@dataclass(frozen=True)
class ParamSlot:
    """Where a parameter owner's values live in the compiled circuit.

    The owner's parameters, in the layout of the symbolic group, are
    ``tables[key][bank]`` (``tables[key]`` when ``bank`` is None), flattened and read at
    ``positions`` when that is not None (one position per sparse edge, in edge order);
    ``tables`` are the normalised tables of :meth:`pclayer.TensorCircuit.log_tables`.
    """

    key: str
    bank: int | None
    positions: torch.Tensor | None


def parameter_slots(root: NodeGroup) -> dict[int, ParamSlot]:
    """The :class:`ParamSlot` of every parameter owner (input group with a distribution
    table or Gaussian, sum group) of the circuit rooted at ``root``, by owner ``uid``: the
    same slots as :func:`build_plan` assigns."""
    _, params, fixed = _build(root)
    slots = {}
    for banks in (params, fixed):
        for uid, (key, bank) in banks.slot.items():
            if key.endswith("_mask"):
                continue
            sparse = uid in params.positions
            slots[uid] = ParamSlot(key, None if sparse else bank, params.positions.get(uid))
    return slots


def build_plan(root: NodeGroup) -> Plan:
    """Compile the circuit rooted at ``root`` (one node) into a :class:`Plan`."""
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
    layout, params, fixed = _Layout(), _Banks(), _Banks()
    layers = [_input_layer(by_level[0], layout, params, fixed)]  # type: ignore[arg-type]
    for depth in range(1, max(by_level) + 1):
        products = [g for g in by_level[depth] if isinstance(g, ProductGroup)]
        sums = [g for g in by_level[depth] if isinstance(g, SumGroup)]
        if products:
            layers.append(_product_layer(products, layout, len(layers)))
        if sums:
            layers.append(_sum_layer(sums, layout, len(layers), params, fixed))
    stacked_fixed = fixed.stacked()
    for key in [k for k in stacked_fixed if k.endswith("_mask")]:
        stacked_fixed[key] = stacked_fixed[key][0]
    stacked_params = params.stacked()
    for key in [k for k in stacked_params if k.startswith("sparse_")]:
        stacked_params[key] = stacked_params[key][0]
    plan = Plan(
        num_vars=len(var_cats),
        var_cats=var_cats,
        layers=layers,
        root=layout.where[root.uid],
        params=stacked_params,
        fixed=stacked_fixed,
    )
    return plan, params, fixed
