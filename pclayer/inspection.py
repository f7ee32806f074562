"""Read-only views of a circuit: groups, variables, edges and normalised parameters.

:func:`describe` turns a symbolic circuit (its root group) into a :class:`CircuitView`, a
tuple of :class:`GroupView` in topological order (children before parents) that names
every group's children by index and holds its edges and parameters as plain float64
tensors. Given the circuit compiled from that root, the parameters are the compiled
circuit's current ones (after training), normalised; otherwise those stored on the groups.
Views are copies: changing them changes neither circuit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pclayer.compiler import ParamSlot, parameter_slots
from pclayer.distributions import Bernoulli, Binomial, Categorical, Distribution, Gaussian, Indicator
from pclayer.nodes import InputGroup, NodeGroup, ProductGroup, SumGroup, topological_order


@dataclass(frozen=True)
class GroupView:
    """One node group.

    Attributes:
        index: position in :attr:`CircuitView.groups`.
        name: the group's name.
        kind: ``"input"``, ``"product"`` or ``"sum"``.
        num_nodes: number of nodes.
        scope: sorted variables the group covers.
        children: indices of the child groups, in order (their nodes are concatenated).
        var: the variable of an input group, else None.
        distribution: the distribution of an input group, else None.
        edges: products: (num_nodes, num_children) LongTensor, entry ``[j, i]`` is the node
            of child ``i`` multiplied into node ``j``; sums: (2, E) LongTensor of
            (sum node, child node) pairs (every pair for a dense sum); inputs: None.
        params: normalised float64 parameters. Sums: ``"weights"`` (num_nodes,
            num_child_nodes), zero where there is no edge, rows summing to one.
            Categorical: ``"probs"`` (num_nodes, K); Bernoulli: ``"p"`` (num_nodes,);
            Gaussian: ``"mean"``, ``"std"`` (num_nodes,); Indicator: ``"values"``
            (num_nodes,) LongTensor. Products: empty.
        tied_to: index of the group whose parameters this one shares (None if it owns them,
            or shares those of a group outside this circuit).
    """

    index: int
    name: str
    kind: str
    num_nodes: int
    scope: tuple[int, ...]
    children: tuple[int, ...]
    var: int | None
    distribution: Distribution | None
    edges: torch.Tensor | None
    params: dict[str, torch.Tensor]
    tied_to: int | None


@dataclass(frozen=True)
class CircuitView:
    """A whole circuit: ``groups`` in topological order, the root last.

    Attributes:
        groups: every group reachable from the root, children before parents.
        var_cats: categories per variable ``0..num_vars-1`` (0 for Gaussian variables).
    """

    groups: tuple[GroupView, ...]
    var_cats: tuple[int, ...]

    @property
    def root(self) -> GroupView:
        """The root group (one node)."""
        return self.groups[-1]

    @property
    def num_vars(self) -> int:
        """Number of variables."""
        return len(self.var_cats)


def _variable_cats(order: list[NodeGroup]) -> tuple[int, ...]:
    cats: dict[int, int] = {}
    for group in order:
        if isinstance(group, InputGroup):
            cats[group.var] = 0 if isinstance(group.dist, Gaussian) else int(group.dist.num_cats)
    missing = sorted(set(range(max(cats) + 1)) - set(cats))
    if missing:
        raise ValueError(f"root: the circuit must cover variables 0..{max(cats)}; it misses {missing[:10]}")
    return tuple(cats[v] for v in range(len(cats)))


def _symbolic_params(group: NodeGroup) -> dict[str, torch.Tensor]:
    if isinstance(group, SumGroup):
        return {"weights": group.dense_weights().detach().clone().double()}
    if isinstance(group, InputGroup):
        if isinstance(group.dist, Indicator):
            return {"values": group.dist.node_values(group.num_nodes).clone()}
        return {key: value.detach().clone().double() for key, value in group.params.items()}
    return {}


def _compiled_params(group: NodeGroup, slot: ParamSlot, tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalised parameters of ``group`` read from the compiled circuit's log tables."""
    table = tables[slot.key] if slot.bank is None else tables[slot.key][slot.bank]
    table = table.detach().cpu().double()
    if isinstance(group, SumGroup):
        if slot.positions is None:
            return {"weights": table.exp()}
        weights = torch.zeros(group.num_nodes, group.num_child_nodes, dtype=torch.float64)
        weights[group.edges[0], group.edges[1]] = table.flatten()[slot.positions].exp()
        return {"weights": weights}
    dist = group.dist
    if isinstance(dist, Indicator):
        return {"values": dist.node_values(group.num_nodes).clone()}
    if isinstance(dist, Gaussian):
        return {"mean": table[0].clone(), "std": table[1].exp()}
    if isinstance(dist, Bernoulli):
        return {"p": table[:, 1].exp()}
    if isinstance(dist, Categorical):
        return {"probs": table.exp()}
    if isinstance(dist, Binomial):
        return {"p": (table.exp() * torch.arange(dist.num_cats, dtype=torch.float64)).sum(-1) / dist.n}
    if dist.tabular:  # any other table-based distribution: its normalised table
        return {"table": table.exp()}
    raise TypeError(f"circuit: no parameter reader for distribution {dist!r}")


def describe(root: NodeGroup, circuit: object | None = None) -> CircuitView:
    """A read-only :class:`CircuitView` of the circuit rooted at ``root``.

    Args:
        root: the root group of a symbolic circuit.
        circuit: optionally the :class:`pclayer.TensorCircuit` compiled from ``root``; the
            view's parameters are then its current parameters (normalised), else the
            parameters stored on the groups.

    Raises:
        TypeError: ``root`` is not a node group or ``circuit`` is not a TensorCircuit.
        ValueError: ``circuit`` was not compiled from ``root`` (other parameter tables).
    """
    from pclayer.circuit import TensorCircuit

    if not isinstance(root, NodeGroup):
        raise TypeError(f"root: expected a node group (pc.inputs / pc.multiply / pc.summate), got {type(root).__name__}")
    if circuit is not None and not isinstance(circuit, TensorCircuit):
        raise TypeError(f"circuit: expected the pclayer.TensorCircuit compiled from root, got {type(circuit).__name__}")
    order = topological_order(root)
    var_cats = _variable_cats(order)
    position = {group.uid: i for i, group in enumerate(order)}
    slots, tables = {}, {}
    if circuit is not None:
        if circuit.num_vars != len(var_cats) or circuit.var_cats.tolist() != list(var_cats):
            raise ValueError(f"circuit: its variables {circuit.var_cats.tolist()[:10]} differ from root's {list(var_cats)[:10]}; "
                             "pass the circuit compiled from root")
        slots = parameter_slots(root)
        with torch.no_grad():
            tables = circuit.log_tables()
        for slot in slots.values():
            table = tables.get(slot.key)
            if table is None or (slot.bank is not None and slot.bank >= table.shape[0]):
                raise ValueError(f"circuit: has no parameter table {slot.key!r}; pass the circuit compiled from root")
    views = []
    for index, group in enumerate(order):
        owner = getattr(group, "param_owner", group)
        slot = slots.get(owner.uid)
        params = _compiled_params(group, slot, tables) if slot is not None else _symbolic_params(group)
        if isinstance(group, SumGroup):
            edges = group.edges if group.edges is not None else torch.cartesian_prod(
                torch.arange(group.num_nodes), torch.arange(group.num_child_nodes)).T
            if params["weights"].shape != (group.num_nodes, group.num_child_nodes):
                raise ValueError(f"circuit: parameters of {group.name!r} have shape {tuple(params['weights'].shape)}; "
                                 "pass the circuit compiled from root")
        elif isinstance(group, ProductGroup):
            edges = group.edges
        else:
            edges = None
        views.append(GroupView(
            index=index,
            name=group.name,
            kind=group.kind,
            num_nodes=group.num_nodes,
            scope=tuple(sorted(group.scope)),
            children=tuple(position[child.uid] for child in group.children),
            var=group.var if isinstance(group, InputGroup) else None,
            distribution=group.dist if isinstance(group, InputGroup) else None,
            edges=None if edges is None else edges.clone(),
            params=params,
            tied_to=position.get(owner.uid) if owner is not group else None,
        ))
    return CircuitView(groups=tuple(views), var_cats=var_cats)
