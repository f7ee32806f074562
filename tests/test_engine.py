"""The one engine: optimised and plain programs agree on every query (public API only), the
scaled representation equals log-sum (values and flows) with its per-layer fallback, and
the optimisation passes, runtime caches and workspaces keep their invariants."""

from __future__ import annotations

import importlib

import numpy as np
import pclayer as pc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pclayer.testing.strategies import circuits as random_circuits
from pclayer.testing.strategies import evidence
from pclayer.plan import ProductLayerSpec, SumLayerSpec
from pclayer.queries.evidence import prepare
from pclayer.representations import LOG_SUM, MAX_PRODUCT, SCALED

F64 = torch.float64


def _args(x, missing, weights):
    return torch.as_tensor(x), torch.as_tensor(missing), None if weights is None else torch.as_tensor(weights)


def _values_and_grads(circuit: pc.TensorCircuit, args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    circuit.zero_grad(set_to_none=True)
    out = circuit.log_prob(*args)
    finite = torch.isfinite(out)
    if out.requires_grad:  # circuits of indicators only have no parameters
        out[finite].sum().backward()
    return out.detach(), {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in circuit.params.items()}


def _assert_programs_agree(root: pc.NodeGroup, args, *, queries: bool = True) -> None:
    """log_prob and its gradients, posterior, sample and mpe through the public API of the
    optimised and the plain program (same parameters: same names, loaded from one another)."""
    fast = pc.compile(root, dtype=F64)
    plain = pc.compile(root, dtype=F64, optimize=False)
    assert fast.plan.optimized and not plain.plan.optimized
    plain.load_state_dict(fast.state_dict())
    v_fast, g_fast = _values_and_grads(fast, args)
    v_plain, g_plain = _values_and_grads(plain, args)
    torch.testing.assert_close(v_fast, v_plain, rtol=1e-12, atol=1e-12)
    for key in g_plain:
        torch.testing.assert_close(g_fast[key], g_plain[key], rtol=1e-10, atol=1e-12, msg=key)
    if not queries:
        return
    x, missing, soft = args
    keep = torch.isfinite(v_fast)
    x, missing, soft = x[keep], missing[keep], None if soft is None else soft[keep]
    if not len(x):
        return
    if not fast.has_continuous:
        torch.testing.assert_close(fast.posterior(x, missing, soft), plain.posterior(x, missing, soft), rtol=1e-10, atol=1e-12)
    draws = [c.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(4)) for c in (fast, plain)]
    torch.testing.assert_close(draws[0], draws[1])
    decoded = [c.mpe(x, missing, soft) for c in (fast, plain)]
    scores = [fast.log_prob(d, None, soft).detach() for d in decoded]  # ties may break differently
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(random_circuits(), st.data())
def test_optimised_and_plain_programs_agree_on_every_query_of_random_circuits(root, data):
    x, missing, weights = data.draw(evidence(root, batch=4))
    _assert_programs_agree(root, _args(x, missing, weights))


@pytest.mark.parametrize("homogeneous", [True, False])
def test_optimised_and_plain_programs_agree_on_hmm(homogeneous):
    root = pc.structures.hmm(6, 5, 4, homogeneous=homogeneous, seed=0)
    x = torch.randint(0, 4, (7, 6), generator=torch.Generator().manual_seed(0))
    missing = torch.rand(7, 6, generator=torch.Generator().manual_seed(1)) < 0.3
    soft = torch.randn(7, 6, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    _assert_programs_agree(root, (x, missing, soft))


def test_optimised_and_plain_programs_agree_on_rat_spn_and_hclt():
    x = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    missing = torch.rand(6, 8, generator=torch.Generator().manual_seed(3)) < 0.3
    _assert_programs_agree(pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0), (x, missing, None))
    _assert_programs_agree(pc.structures.hclt(x, 3, 3, seed=0), (x, missing, None))


def test_the_passes_annotate_the_benchmark_structures():
    """Guards the speed-ups: HMM products read columns, its input output is split per
    position and per-position transition tables are unbound views; RAT-SPN's cross products
    are fused with their sums; the HMM rotates through a handful of buffers."""
    hmm = pc.compile(pc.structures.hmm(5, 4, 3, homogeneous=False, seed=0))
    products = [s for s in hmm.plan.layers if isinstance(s, ProductLayerSpec)]
    assert products and all(s.column_reads is not None for s in products)
    assert hmm.output_cuts[0] == [4] * 5
    assert hmm.split_tables
    assert len(set(hmm.plan.buffer_slots)) <= 4
    rat = pc.compile(pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0))
    assert any(s.outer is not None for s in rat.plan.layers if isinstance(s, ProductLayerSpec))
    assert any(s.fused_cross_products for s in rat.plan.layers if isinstance(s, SumLayerSpec))
    plain = pc.compile(pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0), optimize=False)
    assert plain.plan.buffer_slots is None and not plain.split_tables
    assert all(s.outer is None and s.column_reads is None for s in plain.plan.layers if isinstance(s, ProductLayerSpec))


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_log_matmul_exp_matches_one_shot(monkeypatch, shared):
    """Chunking the child dimension (bounded memory for huge vocabularies) changes nothing:
    values and both gradients agree with the one-shot product, including -inf children."""
    lme = importlib.import_module("pclayer.ops.log_matmul_exp")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2500, generator=gen, dtype=F64) * 3
    x[0, 0, :2000] = -torch.inf
    logw = torch.log_softmax(torch.randn(1 if shared else 2, 4, 2500, generator=gen, dtype=F64), -1)
    grad = torch.randn(3, 2, 4, generator=gen, dtype=F64)

    def run():
        xs, ws = x.clone().requires_grad_(), logw.clone().requires_grad_()
        y = lme.log_matmul_exp(xs, ws)
        y.backward(grad)
        return y.detach(), xs.grad, ws.grad

    one_shot = run()
    monkeypatch.setattr(lme, "_CHUNK_ELEMENTS", 1)  # -> chunks of 1024 columns
    assert len(lme._chunks(x, logw)) == 3
    for a, b in zip(one_shot, run()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 18])
@pytest.mark.parametrize("groups", [1, 3])
def test_max_plus_in_chunks_equals_the_materialised_maximum(monkeypatch, chunk, groups):
    monkeypatch.setattr(importlib.import_module("pclayer.ops.max_plus"), "MAX_PLUS_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 6, generator=gen, dtype=F64)
    x[0, 0, :] = -torch.inf
    logw = torch.randn(groups, 4, 6, generator=gen, dtype=F64)
    expected = (x[:, :, None, :] + logw[None]).amax(-1)
    torch.testing.assert_close(MAX_PRODUCT.sum_dense(x, logw), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Scaled representation against log-sum: values and flows, fallback, caches, workspaces
# ---------------------------------------------------------------------------------------


def _roots_and_flows(circuit: pc.TensorCircuit, args) -> dict[str, tuple[torch.Tensor, dict]]:
    """Root values in the scaled and log-sum representations, with the gradients of both
    w.r.t. every normalised table that requires grad (the EM flows)."""
    ev = prepare(circuit, *args)
    out = {}
    for representation in (SCALED, LOG_SUM):
        tables = {key: value.detach().requires_grad_(key in circuit.params) for key, value in circuit.log_tables().items()}
        wanted = [key for key, value in tables.items() if value.requires_grad]
        root = circuit.evaluate(representation, ev.x, ev.missing, ev.soft_evidence, circuit.tables(tables)).root(circuit)
        grads = {}
        finite = torch.isfinite(root.detach())
        if wanted and bool(finite.any()):
            got = torch.autograd.grad(root[finite].sum(), [tables[k] for k in wanted], allow_unused=True)
            grads = {k: torch.zeros_like(tables[k]) if g is None else g for k, g in zip(wanted, got)}
        out[representation.name] = (root.detach(), grads)
    return out


def _assert_scaled_matches_log_sum(circuit: pc.TensorCircuit, args) -> None:
    out = _roots_and_flows(circuit, args)
    torch.testing.assert_close(out["scaled"][0], out["log-sum"][0], rtol=1e-12, atol=1e-12)
    for key, grad in out["log-sum"][1].items():
        torch.testing.assert_close(out["scaled"][1][key], grad, rtol=1e-10, atol=1e-12, msg=key)


@settings(max_examples=60, deadline=None)
@given(random_circuits(), st.data())
def test_scaled_representation_matches_log_sum_on_random_circuits(root, data):
    """Values and flows agree, with missing values and soft evidence too; layers the scaled
    representation cannot hold exactly (indicator zeros) fall back to log space."""
    x, missing, weights = data.draw(evidence(root, batch=4))
    circuit = pc.compile(root, dtype=F64)
    args = _args(x, missing, weights)
    _assert_scaled_matches_log_sum(circuit, args)
    _assert_scaled_matches_log_sum(circuit, (args[0], None, None))


@pytest.mark.parametrize("structure", ["hmm", "hmm-missing", "rat-spn", "hclt"])
def test_scaled_representation_stays_linear_on_benchmark_structures(structure):
    x = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    missing, soft = None, None
    if structure.startswith("hmm"):
        root = pc.structures.hmm(8, 5, 3, homogeneous=False, seed=0)
        if structure == "hmm-missing":
            missing = torch.rand(6, 8, generator=torch.Generator().manual_seed(4)) < 0.3
            soft = torch.randn(6, 8, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    elif structure == "rat-spn":
        root = pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0)
    else:
        root = pc.structures.hclt(x, 3, 3, seed=0)
    circuit = pc.compile(root, dtype=F64)
    _assert_scaled_matches_log_sum(circuit, (x, missing, soft))
    ev = prepare(circuit, x, missing, soft)
    with torch.no_grad():
        values = circuit.evaluate(SCALED, ev.x, ev.missing, ev.soft_evidence)
    assert not values.logged, "a layer of a benchmark structure left linear space"


def test_a_path_below_the_floor_falls_back_per_layer_and_stays_exact():
    """An identity HMM whose only possible path has probability 1e-800 in float32: the layers
    whose rows span more than the float range are computed in log space, the others stay
    linear (no restart), and log_prob is exact."""
    eps, length = 1e-20, 40
    emit = np.full((3, 3), eps) + np.eye(3) * (1 - 3 * eps)
    root = pc.structures.hmm(length, 3, 3, initial=np.array([1.0, 0.0, 0.0]), transition=np.eye(3), emission=emit)
    circuit = pc.compile(root, dtype=torch.float32)
    x = torch.ones(2, length, dtype=torch.long)
    ev = prepare(circuit, x, None, None)
    with torch.no_grad():
        values = circuit.evaluate(SCALED, ev.x, None, None)
        value = circuit.log_prob(x)
    assert values.logged and len(values.logged) < len(circuit.layers)
    assert torch.isfinite(value).all()
    assert value[0].item() == pytest.approx(length * np.log(eps), rel=1e-5)


def test_product_of_small_factors_is_renormalised_factor_by_factor():
    """A product whose running product would fall below the floor (entries near 2e-10 times
    a factor holding 1e-25) is redone with every factor brought to a row maximum of 1 first:
    it stays in linear space and equals log-sum."""
    flat = torch.tensor([[2e-10, 1 - 2e-10]] * 2, dtype=F64)
    peaked = torch.tensor([[1 - 1e-25, 1e-25], [1e-25, 1 - 1e-25]], dtype=F64)
    a = pc.inputs(0, 2, pc.Categorical(2), params={"probs": flat})
    b = pc.inputs(1, 2, pc.Categorical(2), params={"probs": peaked})
    circuit = pc.compile(pc.summate(pc.multiply(a, b), num_nodes=1), dtype=torch.float32)
    x = torch.tensor([[0, 0], [0, 1], [1, 0]])
    ev = prepare(circuit, x, None, None)
    with torch.no_grad():
        scaled = circuit.evaluate(SCALED, ev.x, None, None)
        expected = circuit.evaluate(LOG_SUM, ev.x, None, None).root(circuit)
    assert not scaled.logged
    torch.testing.assert_close(scaled.root(circuit), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk_elements", [1, 1 << 20])
def test_fused_cross_product_sum_matches_log_sum(monkeypatch, chunk_elements):
    """RAT-SPN's cross-product layers run fused with the sum above them (one chunk of groups
    or one group at a time): values and flows equal log-sum's."""
    monkeypatch.setattr(importlib.import_module("pclayer.ops.cross_product_sum"), "CHUNK_ELEMENTS", chunk_elements)
    circuit = pc.compile(pc.structures.rat_spn(8, 3, 3, 2, 3, seed=1), dtype=F64)
    x = torch.randint(0, 3, (5, 8), generator=torch.Generator().manual_seed(6))
    _assert_scaled_matches_log_sum(circuit, (x, None, None))
    missing = torch.rand(5, 8, generator=torch.Generator().manual_seed(7)) < 0.4
    _assert_scaled_matches_log_sum(circuit, (x, missing, None))


def test_cached_linear_tables_follow_parameter_updates():
    """Under no_grad the linear tables are reused while the parameters are unchanged and
    recomputed into the same buffers after an in-place update (optimizer step, EM)."""
    circuit = pc.compile(pc.structures.hmm(5, 4, 3, homogeneous=False, seed=0), dtype=F64)
    x = torch.randint(0, 3, (5, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = circuit.log_prob(x)
        entries = circuit.runtime.linear_entries
        buffers = {key: entry[1].data_ptr() for key, entry in entries.items()}
        assert buffers
        for p in circuit.params.values():
            p.mul_(1.5)
        after = circuit.log_prob(x)
        assert {key: entry[1].data_ptr() for key, entry in entries.items()} == buffers
        expected = circuit.evaluate(LOG_SUM, x, None, None, circuit.tables(circuit._compute_log_tables())).root(circuit)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=1e-12)


def test_no_grad_workspace_matches_fresh_allocations_across_batches_and_updates():
    """Under no_grad layers write into reused buffers: results equal the grad-enabled path
    (no workspace) for two batch sizes, a batch size seen again, and after an update; earlier
    results are not overwritten by later calls."""
    circuit = pc.compile(pc.structures.hmm(6, 4, 3, homogeneous=False, seed=0), dtype=F64)
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, 3, (b, 6), generator=gen) for b in (7, 3, 7)]

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            reused = circuit.log_prob(x)
        return reused, circuit.log_prob(x).detach()

    first, first_expected = both(batches[0])
    first_copy = first.clone()
    assert getattr(circuit.runtime.local, "entry", (None, {}))[1], "no workspace used"
    for x in batches[1:]:
        reused, expected = both(x)
        torch.testing.assert_close(reused, expected, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        for p in circuit.params.values():
            p.mul_(1.5)
    reused, expected = both(batches[0])
    torch.testing.assert_close(reused, expected, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(reused, first_expected)
    assert torch.equal(first, first_copy)


@settings(max_examples=60, deadline=None)
@given(random_circuits(), st.data())
def test_no_grad_shared_buffers_match_log_sum_on_random_circuits(root, data):
    """Layers share workspace buffers when their outputs are never alive together: on random
    DAGs (shared sub-circuits, products of one factor aliasing their child, sparse sums) the
    no-grad values equal log-sum's."""
    x, _, _ = data.draw(evidence(root, batch=4))
    x = torch.as_tensor(x)
    circuit = pc.compile(root, dtype=F64)
    with torch.no_grad():
        got = circuit.log_prob(x)
        expected = circuit.evaluate(LOG_SUM, x, None, None).root(circuit)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_buffer_plan_never_reuses_a_buffer_that_is_still_read():
    """When a layer is given a buffer, no earlier layer holding it is read at or after that
    layer, and the root's buffer is never reused."""
    x = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    roots = {"hmm": pc.structures.hmm(8, 5, 3, homogeneous=False, seed=0),
             "rat-spn": pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0), "hclt": pc.structures.hclt(x, 3, 3, seed=0)}
    for name, root in roots.items():
        circuit = pc.compile(root)
        slots = circuit.plan.buffer_slots
        readers = {i: [j for j, layer in enumerate(circuit.layers) if j and i in layer.source_layers]
                   for i in range(len(circuit.layers))}
        for i in range(len(circuit.layers)):
            for j in range(i):
                if slots[j] == slots[i]:
                    assert all(r < i for r in readers[j]), (name, i, j)
                    assert j != circuit.root[0], name


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 20])
def test_cross_product_sum_values_and_custom_backward(monkeypatch, shared, chunk_elements):
    """The chunked cross-product contraction and its recomputing backward equal the plain
    einsum and its autograd gradients (float64), for shared and per-group weights."""
    module = importlib.import_module("pclayer.ops.cross_product_sum")
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(3)
    groups, batch, left, right, n = 3, 4, 2, 5, 3
    a = torch.rand(groups, batch, left, generator=gen, dtype=F64, requires_grad=True)
    c = torch.rand(groups, batch, right, generator=gen, dtype=F64, requires_grad=True)
    shape = (left * right, n) if shared else (groups, left * right, n)
    w = torch.rand(*shape, generator=gen, dtype=F64, requires_grad=True)
    got = module.cross_product_sum(a, c, w)
    w4 = (w.expand(groups, *shape) if shared else w).view(groups, left, right, n)
    expected = torch.einsum("gbi,gbj,gijn->gbn", a, c, w4)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.rand(groups, batch, n, generator=gen, dtype=F64)
    for g, r in zip(torch.autograd.grad(got, (a, c, w), upstream), torch.autograd.grad(expected, (a, c, w), upstream)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        crosses, out = torch.empty(groups, batch, left, right, dtype=F64), torch.empty(groups, batch, n, dtype=F64)
        assert module.cross_product_sum(a, c, w, crosses=crosses, out=out) is out
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["hmm", "sparse"])
def test_em_step_hands_its_probabilities_to_the_runtime(monkeypatch, structure):
    """The M-step writes the probabilities it computed into the runtime's linear tables: the
    next no-grad forward normalises nothing, the entries equal the normalised new parameters,
    and log_prob equals log-sum."""
    from pclayer import tables as tables_module
    from pclayer.learn import MiniBatchEM

    if structure == "hmm":
        root = pc.structures.hmm(6, 4, 5, homogeneous=False, seed=0)
    else:  # a sparse sum (masked softmax) over two categorical groups
        a = pc.inputs(0, 3, pc.Categorical(5), generator=torch.Generator().manual_seed(1))
        b = pc.inputs(1, 3, pc.Categorical(5), generator=torch.Generator().manual_seed(2))
        edges = torch.tensor([[0, 0, 1, 2], [0, 2, 1, 2]])
        root = pc.summate(pc.summate(pc.multiply(a, b), num_nodes=3, edges=edges), num_nodes=1)
    circuit = pc.compile(root, dtype=F64)
    x = torch.randint(0, 5, (16, circuit.num_vars), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        circuit.log_prob(x)  # creates the entries
    MiniBatchEM(circuit, step_size=0.5).step(x)
    calls = []
    original = tables_module.normalise_linear
    monkeypatch.setattr(tables_module, "normalise_linear", lambda *args: calls.append(args[1]) or original(*args))
    with torch.no_grad():
        got = circuit.log_prob(x)
        expected = circuit.evaluate(LOG_SUM, x, None, None).root(circuit)
    assert calls == []
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    fresh = circuit._compute_log_tables()
    for (key, transposed), (version, table, low) in circuit.runtime.linear_entries.items():
        linear = torch.exp(fresh[key])
        torch.testing.assert_close(table, linear.transpose(1, 2) if transposed else linear, rtol=1e-12, atol=1e-14)
        assert low is None or low == float(table.amin())  # measured on the first request only
        assert circuit.runtime.smallest_linear(key, transposed, version) == float(table.amin())


# ---------------------------------------------------------------------------------------
# The typed plan: stable names, the file format and its migration, the runtime
# ---------------------------------------------------------------------------------------


def _issue_circuit() -> pc.NodeGroup:
    return pc.summate(pc.multiply(*[pc.inputs(v, 3, pc.Categorical(3)) for v in range(2)]),
                      num_nodes=1, edges=[[0, 0], [0, 2]])


@pytest.mark.parametrize("build", [
    _issue_circuit,
    lambda: pc.structures.hmm(4, 3, 5, homogeneous=False, seed=0),
    lambda: pc.structures.hclt(torch.randint(0, 3, (20, 6), generator=torch.Generator().manual_seed(0)), 3, 3, seed=0),
    lambda: pc.structures.rat_spn(8, 3, 2, 2, 3, seed=0),
    lambda: pc.structures.poon_domingos((2, 3), 3, 1, 2, seed=0),
    lambda: pc.structures.mixture(*[pc.structures.hmm(4, 2, 3, seed=s) for s in range(2)], seed=0),
])
def test_the_same_circuit_built_twice_has_the_same_parameter_names(build):
    first, second = pc.compile(build()), pc.compile(build())
    assert sorted(first.state_dict()) == sorted(second.state_dict())
    second.load_state_dict(first.state_dict())


@settings(max_examples=20, deadline=None)
@given(random_circuits())
def test_random_dags_built_twice_have_the_same_parameter_names(root):
    """A structure rebuilt in the same process (fresh node ids) gets the same bank names."""
    circuit = pc.compile(root)
    twin = pc.compile(_rebuild(root, {}))
    assert sorted(circuit.state_dict()) == sorted(twin.state_dict())
    twin.load_state_dict(circuit.state_dict())


def _rebuild(group: pc.NodeGroup, memo: dict) -> pc.NodeGroup:
    """A structurally identical copy of ``group`` made through the public constructors."""
    if group.uid in memo:
        return memo[group.uid]
    if isinstance(group, pc.InputGroup):
        owner = group.param_owner
        tie = None if owner is group else _rebuild(owner, memo)
        params = None if tie is not None or isinstance(group.dist, pc.Indicator) else \
            {k: v for k, v in group.params.items()}
        copy = pc.inputs(group.var, group.num_nodes, group.dist, params=params, tie=tie)
    elif isinstance(group, pc.ProductGroup):
        copy = pc.multiply(*[_rebuild(c, memo) for c in group.children], edges=group.edges)
    else:
        owner = group.param_owner
        tie = None if owner is group else _rebuild(owner, memo)
        copy = pc.summate(*[_rebuild(c, memo) for c in group.children], num_nodes=group.num_nodes,
                          edges=group.edges, params=None if tie is not None else group.params, tie=tie)
    memo[group.uid] = copy
    return copy


def test_files_of_format_version_1_load_and_give_the_same_numbers():
    """A file written by pclayer 0.1 (format 1: dense, sparse and tied sums, categorical,
    indicator and Gaussian inputs; tests/fixtures/make_format_v1_fixture.py) is migrated."""
    import json
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures"
    expected = json.loads((fixtures / "circuit_format_v1.json").read_text())
    for optimize in (True, False):
        circuit = pc.load(fixtures / "circuit_format_v1.safetensors", optimize=optimize)
        assert circuit.plan.optimized == optimize
        x, missing = torch.tensor(expected["x"], dtype=F64), torch.tensor(expected["missing"])
        torch.testing.assert_close(circuit.log_prob(x, missing).detach(), torch.tensor(expected["log_prob"], dtype=F64),
                                   rtol=1e-12, atol=1e-12)
        assert sorted(circuit.state_dict()) == expected["state_dict_keys"]


def test_save_load_keeps_optimisation_and_backend(tmp_path):
    circuit = pc.compile(pc.structures.hmm(4, 3, 5, seed=0), optimize=False, backend="torch")
    pc.save(tmp_path / "c.safetensors", circuit)
    loaded = pc.load(tmp_path / "c.safetensors")
    assert not loaded.plan.optimized and loaded.runtime.backend == "torch"
    assert pc.load(tmp_path / "c.safetensors", optimize=True).plan.optimized


def test_backend_is_chosen_at_compile_time_and_checked():
    circuit = pc.compile(pc.structures.hmm(3, 2, 4, seed=0), backend="torch")
    circuit.sample(3)  # draws through the dispatched inverse-CDF choice
    assert circuit.runtime.backend == "torch" and circuit.runtime.last_backend == "torch"
    with pytest.raises(ValueError, match="backend: expected one of"):
        pc.compile(pc.structures.hmm(3, 2, 4, seed=0), backend="gpu")


def test_runtime_state_is_per_circuit_and_not_copied():
    """Caches live on the circuit's runtime only; deep copies and pickles rebuild them."""
    import copy
    import pickle

    circuit = pc.compile(pc.structures.hmm(4, 3, 5, seed=0))
    x = torch.randint(0, 5, (6, 4))
    with torch.no_grad():
        expected = circuit.log_prob(x)
    assert circuit.runtime.linear_entries
    for twin in (copy.deepcopy(circuit), pickle.loads(pickle.dumps(circuit))):
        assert twin.runtime is not circuit.runtime and not twin.runtime.linear_entries
        with torch.no_grad():
            torch.testing.assert_close(twin.log_prob(x), expected)


def test_workspaces_are_per_thread():
    import threading

    circuit = pc.compile(pc.structures.hmm(8, 16, 5, seed=0))
    x = torch.randint(0, 5, (64, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = circuit.log_prob(x).clone()
    results, errors = [], []

    def run():
        try:
            with torch.no_grad():
                for _ in range(20):
                    results.append(torch.equal(circuit.log_prob(x), expected))
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results) and len(results) == 60


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.booleans(), st.booleans())
@settings(max_examples=30, deadline=None)
def test_scaled_dense_sum_with_a_bank_per_group_has_exact_gradients(batch, groups, children, nodes, grad_x, grad_w):
    """The per-group products of the scaled dense sum (one weight bank per group) write into
    one output and have their own backward: both gradients equal finite differences."""
    g = torch.Generator().manual_seed(batch * 100 + groups * 10 + children)
    x = torch.rand(batch, groups, children, generator=g, dtype=F64).requires_grad_(grad_x)
    w = torch.rand(groups, children, nodes, generator=g, dtype=F64).requires_grad_(grad_w or not grad_x)
    assert torch.autograd.gradcheck(lambda a, b: SCALED.sum_dense(a, b), (x, w))
    expected = torch.einsum("bgc,gcn->bgn", x.detach(), w.detach()).reshape(batch, groups * nodes)
    torch.testing.assert_close(SCALED.sum_dense(x, w), expected)
