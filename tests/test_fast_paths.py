"""The compiled program's fast paths (column reads instead of gathers, split outputs and
weight tables, in-place log-matmul-exp) give exactly what the generic gather path gives:
values and gradients, on random circuits and on the structures the benchmarks use."""

from __future__ import annotations

import importlib

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pclayer.testing.strategies import circuits, evidence
from pclayer.layers import ProductLayer, SumLayer
from pclayer.queries.evidence import prepare
from pclayer.linear_tables import TableSource
from pclayer.scaled import scaled_root_value


def _generic_copy(root: pc.NodeGroup) -> pc.TensorCircuit:
    """The same circuit compiled with every fast path switched off."""
    circuit = pc.compile(root, dtype=torch.float64)
    for layer in circuit.layers:
        if isinstance(layer, ProductLayer):
            layer.column_reads = None
            layer.outer = None
            layer.child_starts = [None] * len(layer.child_starts)
        if isinstance(layer, SumLayer):
            for spec in layer.dense:
                spec["start"] = None
    circuit.output_cuts = {}
    circuit.split_tables = []
    return circuit


def _values_and_grads(circuit: pc.TensorCircuit, args) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    circuit.zero_grad(set_to_none=True)
    out = circuit.log_prob(*args)
    finite = torch.isfinite(out)
    if out.requires_grad:  # circuits of indicators only have no parameters
        out[finite].sum().backward()
    grads = {k: (torch.zeros_like(p) if p.grad is None else p.grad).numpy() for k, p in circuit.params.items()}
    return out.detach().numpy(), grads


def _assert_same(root: pc.NodeGroup, args) -> None:
    fast = pc.compile(root, dtype=torch.float64)
    generic = _generic_copy(root)
    v_fast, g_fast = _values_and_grads(fast, args)
    v_gen, g_gen = _values_and_grads(generic, args)
    np.testing.assert_allclose(v_fast, v_gen, rtol=1e-12, atol=1e-12)
    for key in g_gen:
        np.testing.assert_allclose(g_fast[key], g_gen[key], rtol=1e-10, atol=1e-12, err_msg=key)


@settings(max_examples=40, deadline=None)
@given(circuits(), st.data())
def test_fast_paths_match_generic_path_on_random_circuits(root, data):
    x, missing, weights = data.draw(evidence(root, batch=4))
    args = (torch.as_tensor(x), torch.as_tensor(missing), None if weights is None else torch.as_tensor(weights))
    _assert_same(root, args)


@pytest.mark.parametrize("homogeneous", [True, False])
def test_fast_paths_match_generic_path_on_hmm(homogeneous):
    root = pc.structures.hmm(6, 5, 4, homogeneous=homogeneous, seed=0)
    x = torch.randint(0, 4, (7, 6), generator=torch.Generator().manual_seed(0))
    missing = torch.rand(7, 6, generator=torch.Generator().manual_seed(1)) < 0.3
    _assert_same(root, (x, missing, None))


def test_fast_paths_are_used_on_the_benchmark_hmm():
    """Guards the speed-ups: products read columns, the input output is split per position,
    per-position transition tables are unbound views."""
    circuit = pc.compile(pc.structures.hmm(5, 4, 3, homogeneous=False, seed=0))
    products = [layer for layer in circuit.layers if isinstance(layer, ProductLayer)]
    assert products and all(layer.column_reads is not None for layer in products)
    assert circuit.output_cuts[0] == [4] * 5
    assert circuit.split_tables


def test_fast_paths_match_generic_path_on_rat_spn_and_hclt():
    x = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    rat = pc.compile(pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0))
    assert any(layer.outer is not None for layer in rat.layers if isinstance(layer, ProductLayer))
    _assert_same(pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0), (x, None, None))
    _assert_same(pc.structures.hclt(x, 3, 3, seed=0), (x, None, None))


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_log_matmul_exp_matches_one_shot(monkeypatch, shared):
    """Chunking the child dimension (bounded memory for huge vocabularies) changes nothing:
    values and both gradients agree with the one-shot product, including -inf children."""
    lme = importlib.import_module("pclayer.ops.log_matmul_exp")

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2500, generator=gen, dtype=torch.float64) * 3
    x[0, 0, :2000] = -torch.inf
    logw = torch.log_softmax(torch.randn(1 if shared else 2, 4, 2500, generator=gen, dtype=torch.float64), -1)
    grad = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)

    def run():
        xs, ws = x.clone().requires_grad_(), logw.clone().requires_grad_()
        y = lme.log_matmul_exp(xs, ws)
        y.backward(grad)
        return y.detach(), xs.grad, ws.grad

    one_shot = run()
    monkeypatch.setattr(lme, "_CHUNK_ELEMENTS", 1)  # -> chunks of 1024 columns
    assert len(lme._chunks(x, logw)) == 3
    chunked = run()
    for a, b in zip(one_shot, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Scaled linear-space evaluation of the root (pclayer.scaled)
# ---------------------------------------------------------------------------------------


def _scaled_and_log_paths(circuit: pc.TensorCircuit, args) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
    """Root values by the scaled path (None if it declined) and by the log-space program, and
    the gradients of both w.r.t. every normalised table that requires grad (the EM flows)."""
    ev = prepare(circuit, *args)
    tables = {key: value.detach().requires_grad_(key in circuit.params) for key, value in circuit.log_tables().items()}
    wanted = [key for key, value in tables.items() if value.requires_grad]
    scaled = scaled_root_value(circuit, TableSource(circuit, circuit._with_bank_views(tables)), ev.x, ev.missing, ev.soft_evidence)
    log = circuit.root_value(circuit.layer_values(ev.x, ev.missing, ev.soft_evidence, tables=tables))
    grads = {}
    for name, value in (("scaled", scaled), ("log", log)):
        if value is not None and wanted:
            finite = torch.isfinite(value.detach())
            got = torch.autograd.grad(value[finite].sum(), [tables[k] for k in wanted], allow_unused=True)
            grads[name] = {k: torch.zeros_like(tables[k]) if g is None else g for k, g in zip(wanted, got)}
    return scaled, log, grads


def _assert_scaled_matches_log(circuit: pc.TensorCircuit, args, *, must_run: bool) -> None:
    scaled, log, grads = _scaled_and_log_paths(circuit, args)
    if scaled is None:
        assert not must_run, "the scaled path declined a circuit it should evaluate"
        return
    torch.testing.assert_close(scaled, log, rtol=1e-12, atol=1e-12)
    for key in grads.get("log", {}):
        torch.testing.assert_close(grads["scaled"][key], grads["log"][key], rtol=1e-10, atol=1e-12, msg=key)


@settings(max_examples=60, deadline=None)
@given(circuits(), st.data())
def test_scaled_root_value_matches_log_space_program_on_random_circuits(root, data):
    """Values and flows (gradients w.r.t. the normalised tables) agree wherever the scaled
    path accepts; with missing values and soft evidence too."""
    x, missing, weights = data.draw(evidence(root, batch=4))
    args = (torch.as_tensor(x), torch.as_tensor(missing), None if weights is None else torch.as_tensor(weights))
    circuit = pc.compile(root, dtype=torch.float64)
    _assert_scaled_matches_log(circuit, args, must_run=False)
    _assert_scaled_matches_log(circuit, (args[0], None, None), must_run=False)


@pytest.mark.parametrize("structure", ["hmm", "hmm-missing", "rat-spn", "hclt"])
def test_scaled_root_value_runs_and_matches_on_benchmark_structures(structure):
    x = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    missing, soft = None, None
    if structure.startswith("hmm"):
        root = pc.structures.hmm(8, 5, 3, homogeneous=False, seed=0)
        if structure == "hmm-missing":
            missing = torch.rand(6, 8, generator=torch.Generator().manual_seed(4)) < 0.3
            soft = torch.randn(6, 8, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    elif structure == "rat-spn":
        root = pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0)
    else:
        root = pc.structures.hclt(x, 3, 3, seed=0)
    _assert_scaled_matches_log(pc.compile(root, dtype=torch.float64), (x, missing, soft), must_run=True)


def test_scaled_path_declines_a_path_below_the_floor_and_log_prob_stays_exact():
    """An identity HMM whose only possible path has probability 1e-800: the scaled path must
    hand over to the log-space program (per-row exact fallback), and log_prob stays finite."""
    eps, length = 1e-20, 40
    emit = np.full((3, 3), eps) + np.eye(3) * (1 - 3 * eps)
    root = pc.structures.hmm(length, 3, 3, initial=np.array([1.0, 0.0, 0.0]), transition=np.eye(3), emission=emit)
    circuit = pc.compile(root, dtype=torch.float32)
    x = torch.ones(2, length, dtype=torch.long)
    ev = prepare(circuit, x, None, None)
    with torch.no_grad():
        assert scaled_root_value(circuit, TableSource(circuit, None), ev.x, None, None) is None
        value = circuit.log_prob(x)
    assert torch.isfinite(value).all()
    assert value[0].item() == pytest.approx(length * np.log(eps), rel=1e-5)


def test_cached_linear_tables_follow_parameter_updates():
    """Under no_grad the linear tables are reused while the parameters are unchanged and
    recomputed after an in-place update (optimizer step, EM)."""
    circuit = pc.compile(pc.structures.hmm(5, 4, 3, homogeneous=False, seed=0), dtype=torch.float64)
    x = torch.randint(0, 3, (5, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = circuit.log_prob(x)
        cache = circuit.__dict__["_linear_tables"]
        buffers = {key: entry[1].data_ptr() for key, entry in cache.entries.items()}
        assert buffers
        for p in circuit.params.values():
            p.mul_(1.5)
        after = circuit.log_prob(x)
        # recomputed into the same buffers (no fresh allocation per parameter version)
        assert {key: entry[1].data_ptr() for key, entry in cache.entries.items()} == buffers
        expected = circuit.root_value(circuit.layer_values(x, None, None))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_elements", [1, 1 << 20])
def test_fused_cross_product_sum_matches_log_space_program(monkeypatch, chunk_elements):
    """RAT-SPN's cross-product layers run fused with the sum above them (one chunk of groups
    or one group at a time): values and flows equal the log-space program's."""
    scaled = importlib.import_module("pclayer.scaled")
    monkeypatch.setattr(importlib.import_module("pclayer.ops.cross_product_sum"), "CHUNK_ELEMENTS", chunk_elements)
    circuit = pc.compile(pc.structures.rat_spn(8, 3, 3, 2, 3, seed=1), dtype=torch.float64)
    assert scaled._fusable_cross_products(circuit)
    x = torch.randint(0, 3, (5, 8), generator=torch.Generator().manual_seed(6))
    _assert_scaled_matches_log(circuit, (x, None, None), must_run=True)
    missing = torch.rand(5, 8, generator=torch.Generator().manual_seed(7)) < 0.4
    _assert_scaled_matches_log(circuit, (x, missing, None), must_run=True)


def test_no_grad_workspace_matches_fresh_allocations_across_batches_and_updates():
    """Under no_grad the scaled path writes into reused per-layer buffers: its results equal
    those of the grad-enabled path (no workspace) for two batch sizes, a batch size seen
    again, and after a parameter update; earlier results are not overwritten by later calls."""
    circuit = pc.compile(pc.structures.hmm(6, 4, 3, homogeneous=False, seed=0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, 3, (b, 6), generator=gen) for b in (7, 3, 7)]

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            reused = circuit.log_prob(x)
        return reused, circuit.log_prob(x).detach()

    first, first_expected = both(batches[0])
    first_copy = first.clone()
    assert any(buffers for _, buffers in circuit.__dict__["_scaled_workspaces"].values()), "no workspace used"
    for x in batches[1:]:
        reused, expected = both(x)
        torch.testing.assert_close(reused, expected, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        for p in circuit.params.values():
            p.mul_(1.5)
    reused, expected = both(batches[0])
    torch.testing.assert_close(reused, expected, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(reused, first_expected)
    torch.testing.assert_close(first, first_expected, rtol=1e-13, atol=1e-13)
    assert torch.equal(first, first_copy)


@settings(max_examples=60, deadline=None)
@given(circuits(), st.data())
def test_no_grad_shared_buffers_match_the_log_space_program_on_random_circuits(root, data):
    """Layers share workspace buffers when their outputs are never alive together: on random
    DAGs (shared sub-circuits, products of one factor that alias their child, sparse sums)
    the no-grad scaled values equal the log-space program's."""
    x, _, _ = data.draw(evidence(root, batch=4))
    x = torch.as_tensor(x)
    circuit = pc.compile(root, dtype=torch.float64)
    with torch.no_grad():
        got = circuit.log_prob(x)
        expected = circuit.root_value(circuit.layer_values(x, None, None))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_buffer_plan_never_reuses_a_buffer_that_is_still_read():
    """Invariant of the plan on the benchmark structures: when a layer is given a buffer, no
    earlier layer holding that buffer is read at or after that layer (directly or through a
    product of one factor), and HMM layers rotate through a handful of buffers."""
    scaled = importlib.import_module("pclayer.scaled")
    x = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    roots = {"hmm": pc.structures.hmm(8, 5, 3, homogeneous=False, seed=0),
             "rat-spn": pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0), "hclt": pc.structures.hclt(x, 3, 3, seed=0)}
    for name, root in roots.items():
        circuit = pc.compile(root)
        plan = scaled._buffer_plan(circuit)
        readers = {i: [j for j, layer in enumerate(circuit.layers) if j and i in layer.source_layers]
                   for i in range(len(circuit.layers))}
        for i in range(len(circuit.layers)):
            for j in range(i):
                if plan[j] == plan[i]:
                    assert all(r < i for r in readers[j]), (name, i, j)
                    assert j != circuit.root[0], name
        if name == "hmm":
            assert len(set(plan)) <= 4, plan


def test_product_of_small_factors_is_renormalised_factor_by_factor():
    """A product whose running product would fall below the floor (a factor of entries near
    2e-10 times a renormalised factor holding 1e-25) is redone with every factor brought to
    a row maximum of 1 first: the scaled path still accepts and equals the log-space program."""
    flat = torch.tensor([[2e-10, 1 - 2e-10]] * 2, dtype=torch.float64)  # both nodes: p(0) = 2e-10
    peaked = torch.tensor([[1 - 1e-25, 1e-25], [1e-25, 1 - 1e-25]], dtype=torch.float64)
    a = pc.inputs(0, 2, pc.Categorical(2), params={"probs": flat})
    b = pc.inputs(1, 2, pc.Categorical(2), params={"probs": peaked})
    root = pc.summate(pc.multiply(a, b), num_nodes=1)
    circuit = pc.compile(root, dtype=torch.float32)
    x = torch.tensor([[0, 0], [0, 1], [1, 0]])
    ev = prepare(circuit, x, None, None)
    with torch.no_grad():
        scaled = scaled_root_value(circuit, TableSource(circuit, None), ev.x, None, None)
        expected = circuit.root_value(circuit.layer_values(x, None, None))
    assert scaled is not None
    torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("structure", ["hmm", "rat-spn", "hclt"])
def test_no_grad_scaled_path_matches_log_space_program_on_benchmark_structures(structure):
    """The no-grad path (cached linear tables, workspace buffers, per-group products written
    into column blocks) on the benchmark structures equals the log-space program."""
    x = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    roots = {"hmm": lambda: pc.structures.hmm(8, 5, 3, homogeneous=False, seed=0),
             "rat-spn": lambda: pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0),
             "hclt": lambda: pc.structures.hclt(x, 3, 3, seed=0)}
    circuit = pc.compile(roots[structure](), dtype=torch.float64)
    ev = prepare(circuit, x, None, None)
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the buffers
            scaled = scaled_root_value(circuit, TableSource(circuit, None), ev.x, None, None)
            assert scaled is not None
            torch.testing.assert_close(scaled, circuit.root_value(circuit.layer_values(x, None, None)),
                                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 20])
def test_cross_product_sum_values_and_custom_backward(monkeypatch, shared, chunk_elements):
    """The chunked cross-product contraction and its recomputing backward equal the plain
    einsum and its autograd gradients (float64), for shared and per-group weights."""
    module = importlib.import_module("pclayer.ops.cross_product_sum")
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(3)
    groups, batch, left, right, n = 3, 4, 2, 5, 3
    a = torch.rand(groups, batch, left, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.rand(groups, batch, right, generator=gen, dtype=torch.float64, requires_grad=True)
    shape = (left * right, n) if shared else (groups, left * right, n)
    w = torch.rand(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    got = module.cross_product_sum(a, c, w)
    w4 = (w.expand(groups, *shape) if shared else w).view(groups, left, right, n)
    expected = torch.einsum("gbi,gbj,gijn->gbn", a, c, w4)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.rand(groups, batch, n, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(got, (a, c, w), upstream)
    reference = torch.autograd.grad(expected, (a, c, w), upstream)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        crosses, out = torch.empty(groups, batch, left, right, dtype=torch.float64), torch.empty(groups, batch, n, dtype=torch.float64)
        assert module.cross_product_sum(a, c, w, crosses=crosses, out=out) is out
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["hmm", "sparse"])
def test_em_step_refreshes_the_linear_tables(monkeypatch, structure):
    """The M-step writes the probabilities it computed into the existing linear-table entries:
    the next no-grad forward normalises nothing, the entries equal softmax of the new
    parameters, and log_prob equals the log-space program."""
    from pclayer.learn import MiniBatchEM
    from pclayer.linear_tables import LinearTableCache, _raw_tensors

    if structure == "hmm":
        root = pc.structures.hmm(6, 4, 5, homogeneous=False, seed=0)
    else:  # a sparse sum (masked softmax) over two categorical groups
        a = pc.inputs(0, 3, pc.Categorical(5), generator=torch.Generator().manual_seed(1))
        b = pc.inputs(1, 3, pc.Categorical(5), generator=torch.Generator().manual_seed(2))
        products = pc.multiply(a, b)
        edges = torch.tensor([[0, 0, 1, 2], [0, 2, 1, 2]])
        root = pc.summate(pc.summate(products, num_nodes=3, edges=edges), num_nodes=1)
    circuit = pc.compile(root, dtype=torch.float64)
    x = torch.randint(0, 5, (16, circuit.num_vars), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        circuit.log_prob(x)  # creates the entries
    MiniBatchEM(circuit, step_size=0.5).step(x)
    calls = []
    original = LinearTableCache._normalise_into
    monkeypatch.setattr(LinearTableCache, "_normalise_into", lambda *args: calls.append(args[3]) or original(*args))
    with torch.no_grad():
        got = circuit.log_prob(x)
        expected = circuit.root_value(circuit.layer_values(x, None, None))
    assert calls == []
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    cache = circuit.__dict__["_linear_tables"]
    for (key, transposed), (_, table, low) in cache.entries.items():
        raw, mask = _raw_tensors(circuit, key)
        softmax = torch.softmax(raw if mask is None else raw.masked_fill(~mask, -torch.inf), dim=-1)
        torch.testing.assert_close(table, softmax.transpose(1, 2) if transposed else softmax, rtol=1e-12, atol=1e-14)
        assert low == float(table.amin())
