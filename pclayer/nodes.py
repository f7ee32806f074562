"""Symbolic circuits: vectors of nodes ("node groups") in the PyJuice style.

A node group is a vector of ``num_nodes`` nodes of one kind with one scope:

* :func:`inputs` — ``num_nodes`` input distributions over one variable;
* :func:`multiply` — products: node ``j`` multiplies one node of every child group
  (node ``j`` of each child by default, or ``edges[j, i]`` of child ``i``);
* :func:`summate` — sums: every node is a weighted mixture of the nodes of its children
  (all of them by default, or those listed in ``edges``).

Groups are immutable once built and may be shared (the circuit is a DAG). Validity is
checked at construction: products must be decomposable (disjoint child scopes) and
sums smooth (equal child scopes); the error names the group and the variables.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch

from pclayer.distributions import Distribution, _check_probability_rows, random_probabilities
from pclayer.errors import StructureError

_ids = itertools.count()


class NodeGroup:
    """A vector of ``num_nodes`` nodes sharing one kind and one scope."""

    kind: str = "group"

    def __init__(self, num_nodes: int, scope: frozenset[int], children: tuple[NodeGroup, ...], name: str | None):
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes: expected a positive int, got {num_nodes!r}")
        self.num_nodes = num_nodes
        self.scope = scope
        self.children = children
        self.uid = next(_ids)
        self.name = name if name is not None else f"{self.kind}#{self.uid}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_nodes={self.num_nodes}, scope={sorted(self.scope)})"


def _format_scope(scope: Iterable[int]) -> str:
    items = sorted(scope)
    shown = ", ".join(str(v) for v in items[:12])
    return "{" + shown + (", ..." if len(items) > 12 else "") + "}"


def _check_tie(group: NodeGroup, tie: NodeGroup | None, signature: tuple) -> NodeGroup | None:
    if tie is None:
        return None
    if type(tie) is not type(group):
        raise StructureError(f"tie: group {group.name!r} ({group.kind}) cannot share parameters with {tie.name!r} ({tie.kind})")
    if tie.param_signature() != signature:
        raise StructureError(
            f"tie: group {group.name!r} has parameter shape {signature}, but {tie.name!r} has {tie.param_signature()}"
        )
    return tie.param_owner


class InputGroup(NodeGroup):
    """``num_nodes`` input distributions over one variable."""

    kind = "input"

    def __init__(self, var: int, num_nodes: int, dist: Distribution, params: dict[str, torch.Tensor] | None,
                 tie: InputGroup | None, name: str | None, generator: torch.Generator | None):
        if isinstance(var, bool) or not isinstance(var, int) or var < 0:
            raise ValueError(f"var: expected a non-negative int variable index, got {var!r}")
        if not isinstance(dist, Distribution):
            raise TypeError(f"dist: expected a pclayer distribution (Categorical, Bernoulli, Binomial, Indicator, Gaussian or a Distribution subclass), got {dist!r}")
        super().__init__(num_nodes, frozenset([var]), (), name)
        self.var = var
        self.dist = dist
        owner = _check_tie(self, tie, self.param_signature())
        self.param_owner: InputGroup = owner if owner is not None else self
        if owner is not None:
            if params is not None:
                raise ValueError("params: a tied group takes the parameters of the group it is tied to")
            self.params = owner.params
        elif params is not None:
            self.params = dist.check_params(params, num_nodes)
        else:
            self.params = dist.init_params(num_nodes, generator)

    def param_signature(self) -> tuple:
        return (*self.dist.signature(), self.num_nodes)


class ProductGroup(NodeGroup):
    """Products; ``edges[j, i]`` is the node of child ``i`` multiplied into node ``j``."""

    kind = "product"

    def __init__(self, children: tuple[NodeGroup, ...], edges: torch.Tensor, name: str | None):
        scope: set[int] = set()
        super().__init__(int(edges.shape[0]), frozenset(), children, name)
        for child in children:
            overlap = scope & child.scope
            if overlap:
                raise StructureError(
                    f"multiply group {self.name!r} is not decomposable: child {child.name!r} shares variables "
                    f"{_format_scope(overlap)} with an earlier child"
                )
            scope |= child.scope
        self.scope = frozenset(scope)
        self.edges = edges


class SumGroup(NodeGroup):
    """Weighted sums over the concatenated nodes of the children.

    ``edges`` is ``None`` (dense: every node sums every child node, ``params`` has shape
    (num_nodes, num_child_nodes)) or a LongTensor (2, E) of (node, child node) pairs
    (sparse: ``params`` has shape (E,), normalised per node).
    """

    kind = "sum"

    def __init__(self, children: tuple[NodeGroup, ...], num_nodes: int, edges: torch.Tensor | None,
                 params: torch.Tensor | None, tie: SumGroup | None, name: str | None,
                 generator: torch.Generator | None):
        super().__init__(num_nodes, children[0].scope, children, name)
        for child in children[1:]:
            if child.scope != self.scope:
                raise StructureError(
                    f"summate group {self.name!r} is not smooth: child {children[0].name!r} covers "
                    f"{_format_scope(children[0].scope)} but child {child.name!r} covers {_format_scope(child.scope)}"
                )
        self.num_child_nodes = sum(c.num_nodes for c in children)
        self.edges = edges
        owner = _check_tie(self, tie, self.param_signature())
        self.param_owner: SumGroup = owner if owner is not None else self
        if owner is not None:
            if params is not None:
                raise ValueError("params: a tied group takes the parameters of the group it is tied to")
            self.params = owner.params
        elif params is not None:
            self.params = self._check_params(params)
        elif edges is None:
            self.params = random_probabilities((num_nodes, self.num_child_nodes), generator)
        else:
            raw = torch.rand(edges.shape[1], generator=generator, dtype=torch.float64) + 0.05
            self.params = raw / torch.zeros(num_nodes, dtype=torch.float64).index_add(0, edges[0], raw)[edges[0]]

    def param_signature(self) -> tuple:
        edge_key = None if self.edges is None else tuple(map(tuple, self.edges.tolist()))
        return ("sum", self.num_nodes, self.num_child_nodes, edge_key)

    def _check_params(self, params: object) -> torch.Tensor:
        probs = torch.as_tensor(params, dtype=torch.float64)
        if torch.isnan(probs).any():
            raise ValueError(f"params: expected no NaN in the weights of summate group {self.name!r}")
        if self.edges is None:
            return _check_probability_rows(probs, "params", (self.num_nodes, self.num_child_nodes))
        if tuple(probs.shape) != (self.edges.shape[1],):
            raise ValueError(f"params: expected shape ({self.edges.shape[1]},) (one weight per edge), got {tuple(probs.shape)}")
        if (probs < 0).any():
            raise ValueError(f"params: expected non-negative weights, got a minimum of {probs.min().item():.4g}")
        sums = torch.zeros(self.num_nodes, dtype=torch.float64).index_add(0, self.edges[0], probs)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
            worst = (sums - 1).abs().argmax().item()
            raise ValueError(f"params: expected the weights of each node to sum to 1, node {worst} sums to {sums[worst].item():.6g}")
        return probs

    def dense_weights(self) -> torch.Tensor:
        """(num_nodes, num_child_nodes) weight matrix (zeros where a sparse group has no edge)."""
        if self.edges is None:
            return self.params
        dense = torch.zeros(self.num_nodes, self.num_child_nodes, dtype=torch.float64)
        dense[self.edges[0], self.edges[1]] = self.params
        return dense


def _check_children(children: Sequence[object], what: str) -> tuple[NodeGroup, ...]:
    if len(children) == 0:
        raise StructureError(f"{what}: expected at least one child group")
    for i, child in enumerate(children):
        if not isinstance(child, NodeGroup):
            raise TypeError(f"{what}: child {i} must be a node group, got {type(child).__name__}")
    return tuple(children)  # type: ignore[return-value]


def inputs(var: int, num_nodes: int, dist: Distribution, *, params: dict | None = None,
           tie: InputGroup | None = None, name: str | None = None,
           generator: torch.Generator | None = None) -> InputGroup:
    """``num_nodes`` input nodes with distribution ``dist`` over variable ``var``.

    Args:
        var: variable index (a column of the data).
        num_nodes: number of nodes in the group.
        dist: a :class:`~pclayer.distributions.Distribution` (``Categorical``, ``Bernoulli``, ``Binomial``,
            ``Indicator``, ``Gaussian``, or your own subclass).
        params: explicit parameters (e.g. ``{"probs": (num_nodes, K)}``); random if omitted.
        tie: another input group of the same shape whose parameters this one shares.
        name: a label used in error messages.
        generator: torch generator for the random initialisation.
    """
    return InputGroup(var, num_nodes, dist, params, tie, name, generator)


def multiply(*children: NodeGroup, edges: object | None = None, name: str | None = None) -> ProductGroup:
    """Products of nodes of decomposable children (pairwise disjoint scopes).

    Without ``edges`` all children must have the same ``num_nodes`` and node ``j``
    multiplies node ``j`` of every child. ``edges`` is an integer array (num_nodes,
    num_children) whose entry ``[j, i]`` picks the node of child ``i`` for product ``j``.
    """
    kids = _check_children(children, "multiply")
    if edges is None:
        sizes = {c.num_nodes for c in kids}
        if len(sizes) != 1:
            detail = ", ".join(f"{c.name!r}: {c.num_nodes}" for c in kids)
            raise StructureError(f"multiply: children must have equal num_nodes without edges, got {detail}")
        edge_tensor = torch.arange(kids[0].num_nodes)[:, None].expand(-1, len(kids)).contiguous()
    else:
        edge_tensor = torch.as_tensor(edges)
        if edge_tensor.dtype.is_floating_point or edge_tensor.ndim != 2 or edge_tensor.shape[1] != len(kids):
            raise ValueError(f"edges: expected an integer array (num_nodes, {len(kids)}), got {tuple(edge_tensor.shape)} {edge_tensor.dtype}")
        edge_tensor = edge_tensor.long()
        for i, child in enumerate(kids):
            column = edge_tensor[:, i]
            if column.numel() and (column.min() < 0 or column.max() >= child.num_nodes):
                raise ValueError(f"edges: column {i} must index nodes of child {child.name!r} in [0, {child.num_nodes})")
    return ProductGroup(kids, edge_tensor, name)


def summate(*children: NodeGroup, num_nodes: int, edges: object | None = None, params: object | None = None,
            tie: SumGroup | None = None, name: str | None = None,
            generator: torch.Generator | None = None) -> SumGroup:
    """``num_nodes`` weighted sums over the (concatenated) nodes of smooth children.

    Args:
        children: groups with identical scopes; their nodes are concatenated in order.
        num_nodes: number of sum nodes.
        edges: ``None`` for dense sums, or an integer array (2, E) of (sum node, child
            node) pairs for sparse ones; every sum node needs at least one edge.
        params: weights, (num_nodes, C) dense or (E,) sparse, non-negative and summing to
            one per sum node; random if omitted.
        tie: a sum group of the same shape and edges whose parameters this one shares.
        name: a label used in error messages.
        generator: torch generator for the random initialisation.
    """
    kids = _check_children(children, "summate")
    edge_tensor = None
    if edges is not None:
        total = sum(c.num_nodes for c in kids)
        edge_tensor = torch.as_tensor(edges)
        if edge_tensor.dtype.is_floating_point or edge_tensor.ndim != 2 or edge_tensor.shape[0] != 2:
            raise ValueError(f"edges: expected an integer array (2, E), got {tuple(edge_tensor.shape)} {edge_tensor.dtype}")
        edge_tensor = edge_tensor.long()
        if edge_tensor.shape[1] == 0 or edge_tensor[0].min() < 0 or edge_tensor[0].max() >= num_nodes:
            raise ValueError(f"edges: row 0 must index sum nodes in [0, {num_nodes})")
        if edge_tensor[1].min() < 0 or edge_tensor[1].max() >= total:
            raise ValueError(f"edges: row 1 must index child nodes in [0, {total})")
        missing = (torch.bincount(edge_tensor[0], minlength=num_nodes) == 0).nonzero().flatten()
        if missing.numel():
            raise StructureError(f"summate: sum nodes {missing[:10].tolist()} have no edges")
        if torch.unique(edge_tensor[0] * total + edge_tensor[1]).numel() != edge_tensor.shape[1]:
            raise ValueError("edges: expected each (node, child) pair at most once")
    return SumGroup(kids, num_nodes, edge_tensor, params, tie, name, generator)


def topological_order(root: NodeGroup) -> list[NodeGroup]:
    """All groups reachable from ``root``, children before parents (iterative DFS)."""
    order: list[NodeGroup] = []
    state: dict[int, int] = {}
    stack: list[tuple[NodeGroup, int]] = [(root, 0)]
    while stack:
        group, i = stack.pop()
        if i == 0:
            if state.get(group.uid) == 2:
                continue
            state[group.uid] = 1
        if i < len(group.children):
            stack.append((group, i + 1))
            child = group.children[i]
            if state.get(child.uid) != 2:
                stack.append((child, 0))
        else:
            state[group.uid] = 2
            order.append(group)
    return order
