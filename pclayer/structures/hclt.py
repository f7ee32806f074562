"""Hidden Chow-Liu trees (HCLT): a Chow-Liu tree over the variables with one latent per variable."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import torch

from pclayer.distributions import Categorical
from pclayer.nodes import NodeGroup, SumGroup, inputs, multiply, summate
from pclayer.structures._checks import positive_int, seeded_generator
from pclayer.structures.mixture import mixture

#: Root choices of :func:`chow_liu_tree` besides a variable index: the tree's centre (the
#: variable of least eccentricity, lowest index on ties), which makes the circuit shallowest.
CENTER = "center"

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


def _joint_entropies_dense(x: torch.Tensor, num_cats: int, pseudocount: float) -> torch.Tensor:
    """(V, V) entropies of all pairs from one (VK x VK) product of one-hot rows, in row chunks;
    every cell of a pair's (K x K) table gets ``pseudocount`` extra counts."""
    num_rows, num_vars = x.shape
    width = num_vars * num_cats
    counts = torch.zeros(width, width, dtype=torch.float64)
    chunk = max(1, _CHUNK_ENTRIES // width)
    for start in range(0, num_rows, chunk):
        onehot = torch.nn.functional.one_hot(x[start:start + chunk], num_cats).to(torch.float64).reshape(-1, width)
        counts += onehot.t() @ onehot
    total = num_rows + pseudocount * num_cats * num_cats
    joint = ((counts + pseudocount) / total).reshape(num_vars, num_cats, num_vars, num_cats).permute(0, 2, 1, 3)
    return _entropies(joint.reshape(num_vars, num_vars, -1))


def _joint_entropies_sorted(x: torch.Tensor, num_cats: int, pseudocount: float) -> torch.Tensor:
    """(V, V) entropies of all pairs from the distinct (pair, value, value) codes, in blocks of
    variables; every cell of a pair's (K x K) table gets ``pseudocount`` extra counts (the
    cells no row reaches are counted, not enumerated)."""
    num_rows, num_vars = x.shape
    block = max(1, _SORT_ENTRIES // (num_rows * num_vars))
    total = num_rows + pseudocount * num_cats * num_cats
    empty_cell = -math.log(pseudocount / total) * pseudocount / total if pseudocount > 0 else 0.0
    out = torch.empty(num_vars, num_vars, dtype=torch.float64)
    for first in range(0, num_vars, block):
        rows = x[:, first:first + block]  # (N, b)
        pair = torch.arange(rows.shape[1])[:, None] * num_vars + torch.arange(num_vars)[None, :]  # (b, V)
        codes = (pair * num_cats + rows[:, :, None]) * num_cats + x[:, None, :]  # (N, b, V)
        values, counts = torch.unique(codes.reshape(-1), return_counts=True)
        probs = (counts.to(torch.float64) + pseudocount) / total
        terms = -torch.xlogy(probs, probs)
        pair_of = values // (num_cats * num_cats)
        block_entropy = torch.zeros(rows.shape[1] * num_vars, dtype=torch.float64)
        block_entropy.index_add_(0, pair_of, terms)
        seen = torch.bincount(pair_of, minlength=rows.shape[1] * num_vars).to(torch.float64)
        block_entropy += (num_cats * num_cats - seen) * empty_cell
        out[first:first + rows.shape[1]] = block_entropy.view(-1, num_vars)
    return out


def _check_pseudocount(pseudocount: object) -> float:
    if isinstance(pseudocount, bool) or not isinstance(pseudocount, (int, float)) or not math.isfinite(pseudocount) \
            or pseudocount < 0:
        raise ValueError(f"pseudocount: expected a finite number >= 0, got {pseudocount!r}")
    return float(pseudocount)


def pairwise_mutual_information(data: object, num_cats: int, *, pseudocount: float = 0.0) -> torch.Tensor:
    """Mutual information (in nats) between every pair of variables, Laplace-smoothed.

    Args:
        data: (N, V) integer tensor or array of category indices in ``[0, num_cats)``.
        num_cats: number of categories K of every variable.
        pseudocount: total extra count added to each pair's (K x K) table of counts,
            spread evenly over its K^2 cells (as EM's pseudocount is spread over a node's
            children), so it weighs the same against the N rows whatever K is (0: the
            empirical distribution). The single-variable marginals are those of the
            smoothed pair tables, so the information stays non-negative.

    Returns:
        (V, V) float64 symmetric tensor ``I(x_i; x_j) = H(x_i) + H(x_j) - H(x_i, x_j)``, with
        a zero diagonal. All pairs are counted at once: by a product of one-hot data when
        ``V * K`` is small, else by sorting codes of (pair, value, value), so the memory
        stays bounded for large ``K``.
    """
    num_cats = positive_int(num_cats, "num_cats")
    cell = _check_pseudocount(pseudocount) / (num_cats * num_cats)  # extra count per cell of a pair table
    x = _check_data(data, num_cats)
    num_rows, num_vars = x.shape
    codes = torch.arange(num_vars) * num_cats + x
    counts = torch.bincount(codes.reshape(-1), minlength=num_vars * num_cats).to(torch.float64)
    marginal = (counts + cell * num_cats) / (num_rows + cell * num_cats * num_cats)
    entropy = _entropies(marginal.view(num_vars, num_cats))
    if num_vars * num_cats <= _DENSE_WIDTH:
        joint_entropy = _joint_entropies_dense(x, num_cats, cell)
    else:
        joint_entropy = _joint_entropies_sorted(x, num_cats, cell)
    joint_entropy = 0.5 * (joint_entropy + joint_entropy.t())  # equal up to summation order
    info = (entropy[:, None] + entropy[None, :] - joint_entropy).clamp_min(0.0)
    info.fill_diagonal_(0.0)
    return info


def _tree_root(tree: nx.Graph, root: object) -> int:
    num_vars = tree.number_of_nodes()
    if root == CENTER:
        return min(nx.center(tree))
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < num_vars:
        raise ValueError(f"root: expected {CENTER!r} or a variable index in [0, {num_vars}), got {root!r}")
    return root


def chow_liu_tree(data: object, num_cats: int, *, root: int | str = 0,
                  pseudocount: float = 0.0) -> list[tuple[int, int]]:
    """Edges of the Chow-Liu tree of ``data``: a maximum spanning tree of pairwise mutual information.

    Args:
        data: (N, V) integer tensor or array of category indices in ``[0, num_cats)``.
        num_cats: number of categories K of every variable.
        root: the variable the tree hangs from (default 0), or ``"center"`` (:data:`CENTER`):
            the variable of least eccentricity, so that the tree (and a circuit built on it)
            is as shallow as possible. Fewer layers are not always faster: on 32 variables
            of 256 random categories (the peer benchmark's HCLT) the centre-rooted circuit
            had 8 layers against 12 and its forward took 28-44 ms against 13-14 ms.
        pseudocount: Laplace smoothing of the pair counts (:func:`pairwise_mutual_information`).

    Returns:
        V - 1 directed ``(parent, child)`` edges, in breadth-first order from the root.
    """
    info = pairwise_mutual_information(data, num_cats, pseudocount=pseudocount)
    num_vars = info.shape[0]
    rows, cols = torch.triu_indices(num_vars, num_vars, offset=1)
    graph = nx.Graph()
    graph.add_nodes_from(range(num_vars))
    graph.add_weighted_edges_from(zip(rows.tolist(), cols.tolist(), info[rows, cols].tolist()))
    tree = nx.maximum_spanning_tree(graph, algorithm="kruskal")
    return list(nx.bfs_edges(tree, _tree_root(tree, root)))


def hclt(data: object, num_states: int, num_cats: int, *, seed: int | None = None, root: int | str = 0,
         mi_pseudocount: float = 0.04, tree_num_cats: int | None = None) -> SumGroup:
    """A hidden Chow-Liu tree learned from ``data``, as a circuit with random parameters.

    The structure is the Chow-Liu tree of the observed variables (:func:`chow_liu_tree`)
    with one latent ``z_v`` of ``num_states`` states attached to every variable ``v``:
    ``p(x) = sum_z p(z_r) prod_v p(x_v | z_v) prod_{(u, v) in tree} p(z_v | z_u)``.
    Per tree node ``v`` the circuit holds an input group ``p(x_v | z_v)`` (``num_states``
    categorical nodes over ``num_cats`` categories), for each tree child ``c`` a sum group
    ``p(x_subtree(c) | z_v)`` (``num_states`` nodes over the ``num_states`` nodes of ``c``'s
    block), and their elementwise product ``p(x_subtree(v) | z_v)``; the root is one sum over
    ``z_r``.

    Args:
        data: (N, V) integer tensor or numpy array of category indices, the rows the tree
            is learned from: in ``[0, num_cats)``, or in ``[0, tree_num_cats)`` when the tree
            is learned from coarser data than the leaves model (e.g. binned pixels, or a row
            subsample, for many-category data).
        num_states: latent states H per variable.
        num_cats: categories K of every variable at the leaves.
        seed: seed of the random initialisation (global RNG if None).
        root: the tree's root variable, or ``"center"`` (see :func:`chow_liu_tree`).
        mi_pseudocount: Laplace smoothing of the pair counts behind the tree: the total
            extra count of each pair's table (0.04: 0.01 per cell of a binary pair's table).
        tree_num_cats: categories of ``data`` when it is not on the leaves' scale
            (default: ``num_cats``).

    Returns:
        The root group (one node) over variables ``0..V-1``. Free parameters:
        ``V * H * (K - 1) + (V - 1) * H * (H - 1) + (H - 1)``.
    """
    num_states = positive_int(num_states, "num_states")
    num_cats = positive_int(num_cats, "num_cats")
    tree_num_cats = num_cats if tree_num_cats is None else positive_int(tree_num_cats, "tree_num_cats")
    generator = seeded_generator(seed)
    edges = chow_liu_tree(data, tree_num_cats, root=root, pseudocount=mi_pseudocount)
    top = edges[0][0] if edges else 0
    children: dict[int, list[int]] = {}
    for parent, child in edges:
        children.setdefault(parent, []).append(child)
    blocks: dict[int, NodeGroup] = {}
    for var in reversed([top] + [child for _, child in edges]):
        leaf = inputs(var, num_states, Categorical(num_cats), name=f"hclt.leaf[{var}]", generator=generator)
        messages = [
            summate(blocks.pop(child), num_nodes=num_states, name=f"hclt.latent[{child}|{var}]", generator=generator)
            for child in children.get(var, [])
        ]
        blocks[var] = multiply(leaf, *messages, name=f"hclt.block[{var}]") if messages else leaf
    return summate(blocks[top], num_nodes=1, name="hclt.root", generator=generator)


def hclt_mixture(data: object, num_states: int, num_cats: int, num_components: int, *, seed: int | None = None,
                 root: int | str = 0, mi_pseudocount: float = 0.04, tree_num_cats: int | None = None) -> SumGroup:
    """A mixture of HCLTs with different trees: ``p(x) = sum_i w_i p_i(x)``.

    Component 0's tree is learned from ``data``; component ``i > 0``'s from a bootstrap
    resample of its rows (drawn with replacement, seeded), so the trees differ where the data
    leaves the Chow-Liu tree uncertain. Mixture weights start random and are learned with
    the rest (EM or gradients).

    Args:
        data, num_states, num_cats, root, mi_pseudocount, tree_num_cats: as in :func:`hclt`.
        num_components: number of HCLTs.
        seed: seeds the resampling and every component's initialisation (global RNG if None).

    Returns:
        The root group (one node) mixing the components' roots. Free parameters:
        ``num_components`` times those of one :func:`hclt`, plus ``num_components - 1``.
    """
    num_components = positive_int(num_components, "num_components")
    tree_num_cats = num_cats if tree_num_cats is None else tree_num_cats
    rows = _check_data(data, positive_int(tree_num_cats, "tree_num_cats"))
    generator = seeded_generator(seed)
    components = []
    for index in range(num_components):
        sample = rows if index == 0 else rows[torch.randint(len(rows), (len(rows),), generator=generator)]
        component_seed = int(torch.randint(2**31 - 1, (), generator=generator))
        components.append(hclt(sample, num_states, num_cats, seed=component_seed, root=root,
                               mi_pseudocount=mi_pseudocount, tree_num_cats=tree_num_cats))
    return mixture(*components, seed=int(torch.randint(2**31 - 1, (), generator=generator)))
