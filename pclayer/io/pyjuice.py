"""Import PyJuice ``.jpc`` files without PyJuice and without running code from the file.

``pyjuice.save`` pickles a list of plain dicts, one per node vector ("nodes") in
topological order (children first, the root last)::

    {"type": "Input" | "Product" | "Sum", "num_node_blocks": int, "block_size": int,
     "chs": tuple of earlier indices,
     "edge_ids": ndarray,            # Product: (blocks or nodes, num_chs); Sum: (2, E) block pairs
     "params": ndarray,              # Sum: (E, block_size, child_block_size) weights;
                                     # Input: flat per-node parameters
     "zero_param_mask": ndarray,     # Sum, optional (the weights are already zero there)
     "scope": [var], "dist": bytes,  # Input: the distribution, pickled again
     "source_node": int}             # tied nodes: the node whose parameters they share

Older files use ``num_node_groups``/``group_size`` or ``num_nodes``. The restricted
unpickler admits only numpy's array reconstruction and PyJuice's ``Categorical``,
``ExternProductCategorical``, ``Bernoulli`` and ``Gaussian`` distributions (mapped to
inert stand-ins); any other global is refused with :class:`UnsafePickleError`.

Mapping: blocks become nodes (block ``i`` of size ``b`` is nodes ``i*b .. i*b+b-1``);
``ExternProductCategorical`` becomes :class:`pclayer.Categorical` with its internal
table: PyJuice's ``"unnormalized_ll"`` mode with external log-probabilities ``e`` and
``external_categorical_value_mask`` is pclayer's ``soft_evidence=e`` with
``missing=~value_mask``. Tied nodes become tied groups. PyJuice stores float32 weights; they are renormalised here in float64.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from pclayer.distributions import Bernoulli, Categorical, Gaussian
from pclayer.io.errors import CircuitFileError, UnsafePickleError
from pclayer.nodes import InputGroup, NodeGroup, SumGroup, inputs, multiply, summate

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_DIST_MODULE = "pyjuice.nodes.distributions"


class PyJuiceDistribution:
    """Inert record of a pickled PyJuice distribution: its class name, constructor
    arguments (``__reduce__`` style) and attribute state (default pickling)."""

    signature = "Distribution"
    args: tuple = ()  # set by __init__ (``__reduce__`` pickles); default pickles skip __init__
    state: dict | None = None  # set by __setstate__ (default pickles)

    def __init__(self, *args: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"PyJuice {self.signature}: expected a dict of attributes, got {type(state).__name__}")
        self.state = state

    def attribute(self, name: str, position: int) -> object:
        """Attribute ``name`` from the state, else constructor argument ``position``."""
        if self.state is not None and name in self.state:
            return self.state[name]
        if len(self.args) > position:
            return self.args[position]
        raise CircuitFileError(f"PyJuice {self.signature}: the file does not record {name!r}")


def _stand_in(name: str) -> type:
    return type(name, (PyJuiceDistribution,), {"signature": name})


_DISTRIBUTIONS = {name: _stand_in(name) for name in ("Categorical", "ExternProductCategorical", "Bernoulli", "Gaussian")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_DIST_MODULE) and name in _DISTRIBUTIONS:
            return _DISTRIBUTIONS[name]
        raise UnsafePickleError(f"refusing to load global {module}.{name}: only numpy arrays and the PyJuice "
                                f"distributions {sorted(_DISTRIBUTIONS)} are allowed")

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError("refusing persistent references in a PyJuice file")


def _restricted_loads(data: bytes, where: str) -> object:
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, OverflowError, MemoryError) as err:  # the ways a malformed pickle fails
        raise CircuitFileError(f"{where}: not a readable PyJuice file ({type(err).__name__}: {err})") from None


def _array(info: dict, key: str, where: str, dtype: type) -> np.ndarray:
    value = info.get(key)
    if not isinstance(value, np.ndarray) or value.dtype == object:
        raise CircuitFileError(f"{where}: expected a numeric array in {key!r}, got {type(value).__name__}")
    return value.astype(dtype)


def _sizes(info: dict, where: str) -> tuple[int, int]:
    for blocks_key, size_key in (("num_node_blocks", "block_size"), ("num_node_groups", "group_size")):
        if blocks_key in info:
            blocks, size = info[blocks_key], info[size_key]
            break
    else:
        blocks, size = info.get("num_nodes"), 1
    if not all(isinstance(v, int) and v >= 1 for v in (blocks, size)):
        raise CircuitFileError(f"{where}: invalid node counts ({blocks!r} blocks of size {size!r})")
    return blocks, size


def _rows_normalised(weights: np.ndarray, where: str) -> np.ndarray:
    totals = weights.sum(-1, keepdims=True)
    if (weights < 0).any() or not np.isfinite(weights).all() or (totals <= 0).any():
        raise CircuitFileError(f"{where}: parameters must be finite, non-negative and not all zero per node")
    return weights / totals


def _input_group(info: dict, params: np.ndarray | None, tie: NodeGroup | None, where: str) -> InputGroup:
    blocks, size = _sizes(info, where)
    num_nodes = blocks * size
    scope = info.get("scope")
    if not isinstance(scope, (list, tuple)) or len(scope) != 1 or not isinstance(scope[0], int):
        raise CircuitFileError(f"{where}: expected a univariate input scope [var], got {scope!r}")
    if not isinstance(info.get("dist"), bytes):
        raise CircuitFileError(f"{where}: missing the pickled distribution")
    dist = _restricted_loads(info["dist"], where)
    if not isinstance(dist, PyJuiceDistribution):
        raise CircuitFileError(f"{where}: the distribution is not a PyJuice distribution object")
    if params is None and tie is None:
        raise CircuitFileError(f"{where}: input nodes without parameters (PyJuice saves them after init_parameters)")
    if dist.signature in ("Categorical", "ExternProductCategorical"):
        k = int(dist.attribute("num_cats", 0))
        pc_dist, shaped = Categorical(k), None if params is None else {"probs": _rows_normalised(params.reshape(num_nodes, k), where)}
    elif dist.signature == "Bernoulli":
        pc_dist, shaped = Bernoulli(), None if params is None else {"p": params.reshape(num_nodes)}
    else:
        pc_dist = Gaussian()
        shaped = None if params is None else {"mean": params.reshape(num_nodes, 2)[:, 0], "std": params.reshape(num_nodes, 2)[:, 1]}
    if tie is not None:
        return inputs(scope[0], num_nodes, pc_dist, tie=tie, name=where)
    return inputs(scope[0], num_nodes, pc_dist, params={k: torch.from_numpy(v) for k, v in shaped.items()}, name=where)


def _product_group(info: dict, children: list[NodeGroup], sizes: list[tuple[int, int]], where: str) -> NodeGroup:
    blocks, size = _sizes(info, where)
    edges = _array(info, "edge_ids", where, np.int64)
    if edges.ndim != 2 or edges.shape[1] != len(children):
        raise CircuitFileError(f"{where}: expected product edge_ids of shape (n, {len(children)}), got {edges.shape}")
    if edges.shape[0] == blocks:
        if any(child_size != size for _, child_size in sizes):
            raise CircuitFileError(f"{where}: block-sparse product with children of another block size")
        edges = (edges[:, None, :] * size + np.arange(size)[None, :, None]).reshape(blocks * size, len(children))
    elif edges.shape[0] != blocks * size:
        raise CircuitFileError(f"{where}: product edge_ids has {edges.shape[0]} rows; expected {blocks} or {blocks * size}")
    return multiply(*children, edges=torch.from_numpy(edges), name=where)


def _sum_group(info: dict, children: list[NodeGroup], sizes: list[tuple[int, int]], params: np.ndarray | None,
               tie: SumGroup | None, where: str) -> NodeGroup:
    blocks, size = _sizes(info, where)
    child_sizes = {child_size for _, child_size in sizes}
    if len(child_sizes) != 1:
        raise CircuitFileError(f"{where}: children of a sum must share one block size, got {sorted(child_sizes)}")
    child_size = child_sizes.pop()
    child_blocks = sum(b for b, _ in sizes)
    edges = _array(info, "edge_ids", where, np.int64)
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise CircuitFileError(f"{where}: expected sum edge_ids of shape (2, E), got {edges.shape}")
    if (edges < 0).any() or (edges[0] >= blocks).any() or (edges[1] >= child_blocks).any():
        raise CircuitFileError(f"{where}: sum edge_ids out of range")
    parent = (edges[0][:, None, None] * size + np.arange(size)[None, :, None]).repeat(child_size, axis=2)
    child = (edges[1][:, None, None] * child_size + np.arange(child_size)[None, None, :]).repeat(size, axis=1)
    num_nodes, num_children = blocks * size, child_blocks * child_size
    dense = edges.shape[1] == blocks * child_blocks and len({(a, b) for a, b in edges.T.tolist()}) == edges.shape[1]
    weights = None
    if params is not None:
        if params.size != edges.shape[1] * size * child_size:
            raise CircuitFileError(f"{where}: expected {edges.shape[1] * size * child_size} sum weights, got {params.size}")
        matrix = np.zeros((num_nodes, num_children))
        matrix[parent.reshape(-1), child.reshape(-1)] = params.reshape(-1)
        matrix = _rows_normalised(matrix, where)
        weights = matrix if dense else matrix[parent.reshape(-1), child.reshape(-1)]
    edge_arg = None if dense else torch.from_numpy(np.stack([parent.reshape(-1), child.reshape(-1)]))
    if tie is not None:
        return summate(*children, num_nodes=num_nodes, edges=edge_arg, tie=tie, name=where)
    return summate(*children, num_nodes=num_nodes, edges=edge_arg, params=torch.from_numpy(weights), name=where)


def _node_group(kind: object, info: dict, children: list[NodeGroup], sizes: list[tuple[int, int]],
                params: np.ndarray | None, tie: NodeGroup | None, name: str) -> NodeGroup:
    if kind == "Input":
        return _input_group(info, params, tie, name)
    if kind == "Product" and children:
        return _product_group(info, children, sizes, name)
    if kind == "Sum" and children:
        if params is None and tie is None:
            raise CircuitFileError(f"{name}: sum nodes without parameters (PyJuice saves them after init_parameters)")
        return _sum_group(info, children, sizes, params, tie, name)
    raise CircuitFileError(f"{name}: unknown node type {kind!r} or no children")


def _tie_owners(nodes: list) -> list[int]:
    """For every node, the smallest index of its tie class (itself if untied)."""
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, info in enumerate(nodes):
        source = info.get("source_node")
        if source is not None:
            if not isinstance(source, int) or not 0 <= source < len(nodes):
                raise CircuitFileError(f"node {i}: source_node {source!r} is out of range")
            a, b = find(i), find(source)
            parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(nodes))]


def load_pyjuice(path: str | os.PathLike) -> NodeGroup:
    """Read a PyJuice ``.jpc`` file into a symbolic pclayer circuit.

    Args:
        path: a file written by ``pyjuice.save`` (from nodes or a compiled circuit).

    Returns:
        The root node group; ``pclayer.compile(root)`` gives the tensor circuit.

    Raises:
        UnsafePickleError: the pickle names anything outside the allow-list.
        CircuitFileError: malformed files and PyJuice features pclayer does not map
            (external sum parameters, multivariate or other input distributions).
    """
    where = str(path)
    nodes = _restricted_loads(Path(path).read_bytes(), where)
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, dict) for n in nodes):
        raise CircuitFileError(f"{where}: expected a non-empty list of node dicts (pyjuice.save's format)")
    owners = _tie_owners(nodes)
    params_of: dict[int, np.ndarray] = {}
    for i, info in enumerate(nodes):
        if "params" in info:
            params_of.setdefault(owners[i], _array(info, "params", f"{where} node {i}", np.float64))
    built: list[NodeGroup] = []
    for i, info in enumerate(nodes):
        name = f"pyjuice node {i}"
        kind = info.get("type")
        if "external_params" in info:
            raise CircuitFileError(f"{name}: sum nodes with external parameters are not supported")
        children_ids = info.get("chs", ())
        if not isinstance(children_ids, (tuple, list)) or not all(isinstance(c, int) and 0 <= c < i for c in children_ids):
            raise CircuitFileError(f"{name}: children {children_ids!r} must be indices of earlier nodes")
        children = [built[c] for c in children_ids]
        sizes = [_sizes(nodes[c], f"pyjuice node {c}") for c in children_ids]
        tie = built[owners[i]] if owners[i] != i else None
        params = params_of.get(owners[i]) if tie is None else None
        try:
            built.append(_node_group(kind, info, children, sizes, params, tie, name))
        except CircuitFileError:
            raise
        except (ValueError, TypeError) as err:  # pclayer's own validation of the structure
            raise CircuitFileError(f"{name}: {err}") from None
    return built[-1]
