"""Hidden Chow-Liu trees (HCLT): a Chow-Liu tree over the variables with one latent per variable."""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch

from pclayer.distributions import Categorical
from pclayer.nodes import NodeGroup, SumGroup, inputs, multiply, summate
from pclayer.structures._checks import positive_int, seeded_generator

#: Variable at which the Chow-Liu tree is rooted.
ROOT_VARIABLE = 0

# Joint counts use a dense (VK x VK) one-hot product while V * K is at most this (128 MB of
# float64), and sorting of pair codes otherwise (memory independent of K).
_DENSE_WIDTH = 4096
# Entries per step of the dense product and of the sort (torch.unique needs many times its input).
_CHUNK_ENTRIES = 1 << 22
_SORT_ENTRIES = 1 << 18


def _check_data(data: object, num_cats: int) -> torch.Tensor:
    """``data`` as a (N, V) LongTensor, or an error naming ``data`` and what was expected."""
    if isinstance(data, np.ndarray):
        if data.dtype.kind == "f" and np.isnan(data).any():
            raise ValueError(f"data: expected no NaN, found one at {tuple(int(i) for i in np.argwhere(np.isnan(data))[0])}")
        if data.dtype.kind not in "iu":
            raise TypeError(f"data: expected an integer array of category indices, got dtype {data.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.int64))
    elif isinstance(data, torch.Tensor):
        if data.is_floating_point() and torch.isnan(data).any():
            raise ValueError(f"data: expected no NaN, found one at {tuple(int(i) for i in torch.isnan(data).nonzero()[0])}")
        if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
            raise TypeError(f"data: expected an integer tensor of category indices, got dtype {data.dtype}")
        tensor = data.detach().cpu().long()
    else:
        raise TypeError(f"data: expected a torch.Tensor or numpy.ndarray of shape (N, V), got {type(data).__name__}")
    if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(f"data: expected shape (N, V) with N >= 1 samples and V >= 1 variables, got {tuple(tensor.shape)}")
    bad = (tensor < 0) | (tensor >= num_cats)
    if bad.any():
        row, var = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"data: value {int(tensor[row, var])} at row {row}, variable {var} is out of range [0, {num_cats})")
    return tensor


def _entropies(probs: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(probs, probs).sum(-1)


def _joint_entropies_dense(x: torch.Tensor, num_cats: int) -> torch.Tensor:
    """(V, V) entropies of all pairs from one (VK x VK) product of one-hot rows, in row chunks."""
    num_rows, num_vars = x.shape
    width = num_vars * num_cats
    counts = torch.zeros(width, width, dtype=torch.float64)
    chunk = max(1, _CHUNK_ENTRIES // width)
    for start in range(0, num_rows, chunk):
        onehot = torch.nn.functional.one_hot(x[start:start + chunk], num_cats).to(torch.float64).reshape(-1, width)
        counts += onehot.t() @ onehot
    joint = (counts / num_rows).reshape(num_vars, num_cats, num_vars, num_cats).permute(0, 2, 1, 3)
    return _entropies(joint.reshape(num_vars, num_vars, -1))


def _joint_entropies_sorted(x: torch.Tensor, num_cats: int) -> torch.Tensor:
    """(V, V) entropies of all pairs from the distinct (pair, value, value) codes, in blocks of variables."""
    num_rows, num_vars = x.shape
    block = max(1, _SORT_ENTRIES // (num_rows * num_vars))
    out = torch.empty(num_vars, num_vars, dtype=torch.float64)
    for first in range(0, num_vars, block):
        rows = x[:, first:first + block]  # (N, b)
        pair = torch.arange(rows.shape[1])[:, None] * num_vars + torch.arange(num_vars)[None, :]  # (b, V)
        codes = (pair * num_cats + rows[:, :, None]) * num_cats + x[:, None, :]  # (N, b, V)
        values, counts = torch.unique(codes.reshape(-1), return_counts=True)
        probs = counts.to(torch.float64) / num_rows
        terms = -torch.xlogy(probs, probs)
        block_entropy = torch.zeros(rows.shape[1] * num_vars, dtype=torch.float64)
        block_entropy.index_add_(0, values // (num_cats * num_cats), terms)
        out[first:first + rows.shape[1]] = block_entropy.view(-1, num_vars)
    return out


def pairwise_mutual_information(data: object, num_cats: int) -> torch.Tensor:
    """Empirical mutual information (in nats) between every pair of variables.

    Args:
        data: (N, V) integer tensor or array of category indices in ``[0, num_cats)``.
        num_cats: number of categories K of every variable.

    Returns:
        (V, V) float64 symmetric tensor ``I(x_i; x_j) = H(x_i) + H(x_j) - H(x_i, x_j)`` of the
        empirical distribution (no smoothing), with a zero diagonal. All pairs are counted
        at once: by a product of one-hot data when ``V * K`` is small, else by sorting
        codes of (pair, value, value), so the memory stays bounded for large ``K``.
    """
    num_cats = positive_int(num_cats, "num_cats")
    x = _check_data(data, num_cats)
    num_rows, num_vars = x.shape
    codes = torch.arange(num_vars) * num_cats + x
    marginal = torch.bincount(codes.reshape(-1), minlength=num_vars * num_cats).to(torch.float64) / num_rows
    entropy = _entropies(marginal.view(num_vars, num_cats))
    if num_vars * num_cats <= _DENSE_WIDTH:
        joint_entropy = _joint_entropies_dense(x, num_cats)
    else:
        joint_entropy = _joint_entropies_sorted(x, num_cats)
    joint_entropy = 0.5 * (joint_entropy + joint_entropy.t())  # equal up to summation order
    info = (entropy[:, None] + entropy[None, :] - joint_entropy).clamp_min(0.0)
    info.fill_diagonal_(0.0)
    return info


def chow_liu_tree(data: object, num_cats: int) -> list[tuple[int, int]]:
    """Edges of the Chow-Liu tree of ``data``: a maximum spanning tree of pairwise mutual information.

    Args:
        data: (N, V) integer tensor or array of category indices in ``[0, num_cats)``.
        num_cats: number of categories K of every variable.

    Returns:
        V - 1 directed ``(parent, child)`` edges of the tree rooted at variable
        :data:`ROOT_VARIABLE` (0), in breadth-first order from the root.
    """
    info = pairwise_mutual_information(data, num_cats)
    num_vars = info.shape[0]
    rows, cols = torch.triu_indices(num_vars, num_vars, offset=1)
    graph = nx.Graph()
    graph.add_nodes_from(range(num_vars))
    graph.add_weighted_edges_from(zip(rows.tolist(), cols.tolist(), info[rows, cols].tolist()))
    tree = nx.maximum_spanning_tree(graph, algorithm="kruskal")
    return list(nx.bfs_edges(tree, ROOT_VARIABLE))


def hclt(data: object, num_states: int, num_cats: int, *, seed: int | None = None) -> SumGroup:
    """A hidden Chow-Liu tree learned from ``data``, as a circuit with random parameters.

    The structure is the Chow-Liu tree of the observed variables (:func:`chow_liu_tree`,
    rooted at variable 0) with one latent ``z_v`` of ``num_states`` states attached to every
    variable ``v``: ``p(x) = sum_z p(z_0) prod_v p(x_v | z_v) prod_{(u, v) in tree} p(z_v | z_u)``.
    Per tree node ``v`` the circuit holds an input group ``p(x_v | z_v)`` (``num_states``
    categorical nodes), for each tree child ``c`` a sum group ``p(x_subtree(c) | z_v)``
    (``num_states`` nodes over the ``num_states`` nodes of ``c``'s block), and their
    elementwise product ``p(x_subtree(v) | z_v)``; the root is one sum over ``z_0``.

    Args:
        data: (N, V) integer tensor or numpy array of category indices in ``[0, num_cats)``.
        num_states: latent states H per variable.
        num_cats: categories K of every variable.
        seed: seed of the random initialisation (global RNG if None).

    Returns:
        The root group (one node) over variables ``0..V-1``. Free parameters:
        ``V * H * (K - 1) + (V - 1) * H * (H - 1) + (H - 1)``.
    """
    num_states = positive_int(num_states, "num_states")
    num_cats = positive_int(num_cats, "num_cats")
    generator = seeded_generator(seed)
    edges = chow_liu_tree(data, num_cats)
    children: dict[int, list[int]] = {}
    for parent, child in edges:
        children.setdefault(parent, []).append(child)
    blocks: dict[int, NodeGroup] = {}
    for var in reversed([ROOT_VARIABLE] + [child for _, child in edges]):
        leaf = inputs(var, num_states, Categorical(num_cats), name=f"hclt.leaf[{var}]", generator=generator)
        messages = [
            summate(blocks.pop(child), num_nodes=num_states, name=f"hclt.latent[{child}|{var}]", generator=generator)
            for child in children.get(var, [])
        ]
        blocks[var] = multiply(leaf, *messages, name=f"hclt.block[{var}]") if messages else leaf
    return summate(blocks[ROOT_VARIABLE], num_nodes=1, name="hclt.root", generator=generator)
