"""The typed plan: a compiled circuit as plain data.

:func:`pclayer.compiler.build_plan` turns a symbolic circuit into a :class:`Plan`; the passes
of :mod:`pclayer.passes` annotate it with optimisations (fields marked *pass* below, ``None``
in a plain plan); :class:`pclayer.TensorCircuit` runs it. A plan holds tensors, integers and
strings only, so it serialises as is (:mod:`pclayer.io.native`).

Every record is a dataclass; a new layer type is a new spec dataclass here (the file format
stores any of them by class name, without its pass fields). Layers are evaluated in order. Every non-input layer reads the outputs of earlier layers
through its ``sources``: segments ``(layer, columns)`` gathered into one vector ``z`` (B, M);
children are positions in ``z``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PASS = {"pass": True}
"""Field metadata of optimisation fields: filled by :mod:`pclayer.passes`, never stored in files."""

import torch


@dataclass(frozen=True)
class Bank:
    """One parameter (or fixed) tensor of the plan.

    Attributes:
        name: its key in ``Plan.params`` / ``Plan.fixed``, named by its place in the structure
            (``sum_{N}x{C}`` for dense sums of N nodes over C children, ``sparse_{i}`` for the
            i-th sparse sum group in evaluation order, ``{dist}_{n}x{K}`` for input tables), so
            the same circuit built twice has the same names.
        role: ``"dense_sum"`` (banks, N, C) log-weights, ``"sparse_sum"`` (N, F) log-weights
            with a mask of real children, or ``"input"`` (the parameters of an input
            distribution, interpreted by that distribution).
        distribution: for inputs, the distribution's name (see :mod:`pclayer.distributions`).
        learnable: whether the tensor is a learnable parameter (else a fixed tensor).
        mask: for sparse sums, the key of the (N, F) bool mask in ``Plan.fixed``.
    """

    name: str
    role: str
    distribution: str | None = None
    learnable: bool = True
    mask: str | None = None


@dataclass
class Segment:
    """Columns ``index`` (M_i,) of layer ``layer``'s output, read by a later layer."""

    layer: int
    index: torch.Tensor
    #: pass: ``(start, length)`` when ``index`` is a contiguous run (read as a view).
    span: tuple[int, int] | None = field(default=None, metadata=PASS)


@dataclass
class InputBucket:
    """Input groups of one distribution and table shape, evaluated together.

    Attributes:
        distribution: distribution name; ``key`` the parameter bank (banks, ...).
        num_nodes: nodes per group (n); ``num_cats``: categories (0 for continuous).
        group_bank: (G,) bank row of every group; ``group_var``: (G,) variable of every group.
    """

    distribution: str
    key: str
    num_nodes: int
    num_cats: int
    group_bank: torch.Tensor
    group_var: torch.Tensor
    #: pass: the one bank row every group uses, or None.
    shared_bank: int | None = field(default=None, metadata=PASS)
    #: pass: first variable when ``group_var`` is a contiguous run (columns read as a view).
    var_start: int | None = field(default=None, metadata=PASS)


@dataclass
class InputLayerSpec:
    buckets: list[InputBucket]


@dataclass
class ProductLayerSpec:
    """Products: node ``p`` multiplies ``z[children[p, f]]`` over f; ``padded`` marks rows
    shorter than the widest, filled with the position ``M`` (one past ``z``, the value 1)."""

    sources: list[Segment]
    children: torch.Tensor
    padded: bool
    #: pass: per child column, ``(layer, start, length)`` read straight from an earlier output.
    column_reads: list[tuple[int, int, int]] | None = field(default=None, metadata=PASS)
    #: pass: per child column, the start of a contiguous run of ``z``, or None.
    child_starts: list[int | None] | None = field(default=None, metadata=PASS)
    #: pass: blocks of cross products, ``(left (G, S1), right (G, S2))`` positions of ``z``.
    outer: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, metadata=PASS)
    #: pass: per side of ``outer``, ``(start, step)`` when its groups are evenly spaced runs.
    outer_strides: tuple[tuple[int, int] | None, tuple[int, int] | None] = field(default=(None, None), metadata=PASS)


@dataclass
class DenseBucket:
    """Dense sum groups of one shape: group g's N nodes mix its C children ``z[children[g]]``
    with weights ``params[key][group_bank[g]]`` (N, C)."""

    key: str
    children: torch.Tensor
    group_bank: torch.Tensor
    #: pass: the one bank row every group uses (weights broadcast), or None.
    shared_bank: int | None = field(default=None, metadata=PASS)
    #: pass: start of ``children`` in ``z`` when they are one contiguous run (a view), or None.
    children_start: int | None = field(default=None, metadata=PASS)
    #: pass: first bank row when ``group_bank`` is a contiguous run (a view), or None.
    bank_start: int | None = field(default=None, metadata=PASS)


@dataclass
class SparseBucket:
    """One sparse sum group: node n mixes ``z[children[n, f]]`` with ``params[key][n, f]``
    (padding positions point one past ``z`` and are masked out)."""

    key: str
    children: torch.Tensor


@dataclass
class SumLayerSpec:
    sources: list[Segment]
    dense: list[DenseBucket]
    sparse: list[SparseBucket]
    #: pass: the previous layer is a cross-product layer read only by this one; the
    #: scaled representation evaluates the pair without materialising the cross products.
    fused_cross_products: bool = field(default=False, metadata=PASS)


LayerSpec = InputLayerSpec | ProductLayerSpec | SumLayerSpec


@dataclass
class Plan:
    """A compiled circuit as plain data.

    Attributes:
        num_vars: number of variables (columns 0..num_vars-1).
        var_cats: (num_vars,) categories per variable, 0 for continuous variables.
        layers: layer specs in evaluation order (an input layer first).
        root: (layer, node) of the root node.
        banks: every tensor of ``params`` and ``fixed`` by name, with its role.
        params: learnable tensors by name; fixed: non-learnable tensors by name.
        buffer_slots: pass: workspace buffer id per layer (layers never alive together share).
        optimized: whether the optimisation passes ran.
    """

    num_vars: int
    var_cats: list[int]
    layers: list[LayerSpec]
    root: tuple[int, int]
    banks: dict[str, Bank] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    buffer_slots: list[int] | None = field(default=None, metadata=PASS)
    optimized: bool = field(default=False, metadata=PASS)

    def layer_width(self, index: int) -> int:
        """Number of nodes (output columns) of layer ``index``."""
        spec = self.layers[index]
        if isinstance(spec, InputLayerSpec):
            return sum(b.num_nodes * b.group_bank.numel() for b in spec.buckets)
        if isinstance(spec, ProductLayerSpec):
            return spec.children.shape[0]
        dense = sum(b.children.shape[0] * self.params[b.key].shape[1] for b in spec.dense)
        return dense + sum(b.children.shape[0] for b in spec.sparse)
