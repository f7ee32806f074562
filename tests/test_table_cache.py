"""The runtime's caches of normalised tables: reused only while every parameter and buffer
is unchanged (one invalidation rule), never under autograd."""

from __future__ import annotations

import copy
import io

import pclayer as pc
import pytest
import torch

from pclayer.learn import compute_flows, m_step
from pclayer.representations import LOG_SUM


def _circuit() -> pc.TensorCircuit:
    return pc.compile(pc.structures.hmm(3, 2, 4, seed=0), dtype=torch.float32)


X = torch.tensor([[0, 1, 2], [3, 3, 0]])


def _fresh(circuit: pc.TensorCircuit) -> torch.Tensor:
    """log_prob computed from uncached tables."""
    with torch.no_grad():
        return circuit.evaluate(LOG_SUM, X.to(circuit.device), None, None,
                                circuit.tables(circuit._compute_log_tables())).root(circuit)


def _cached(circuit: pc.TensorCircuit) -> torch.Tensor:
    with torch.no_grad():
        return circuit.log_prob(X)


def _assert_fresh(circuit: pc.TensorCircuit) -> None:
    torch.testing.assert_close(_cached(circuit), _fresh(circuit), rtol=1e-6, atol=1e-6)  # a stale table is off by >= 1e-2


def test_tables_are_reused_without_gradients_and_recomputed_with_them():
    circuit = _circuit()
    with torch.no_grad():
        first, second = circuit.log_tables(), circuit.log_tables()
    assert all(first[key] is second[key] for key in first)
    with_grad = circuit.log_tables()
    assert all(with_grad[key] is not first[key] for key in first if key in circuit.params)
    assert any(t.requires_grad for t in with_grad.values())
    circuit.requires_grad_(False)
    assert circuit.log_tables()["sum_2x2"] is first["sum_2x2"]  # grad mode on, but nothing requires grad
    with torch.inference_mode():
        inference = circuit.log_tables()
    assert inference["sum_2x2"] is not first["sum_2x2"]


def test_a_big_transposed_table_is_built_only_when_calls_reuse_it():
    """Top-k evidence reads the transposed linear table only from the second call at one
    parameter version on (one call alone reads the candidates from the log-tables), and
    a parameter change starts over; every call gives the same likelihood."""
    circuit = _circuit()
    evidence = pc.TopKEvidence(torch.log_softmax(torch.randn(2, 3, 2), -1), torch.tensor([[[0, 1], [2, 3], [1, 0]]] * 2))
    missing = torch.tensor([[True, False, True], [False, True, False]])
    x = torch.tensor([[0, 2, 0], [1, 0, 1]])
    key = next(k for k in circuit.plan.banks if circuit.plan.banks[k].role == "input")
    built = lambda: (key, True) in circuit.runtime.linear_entries  # noqa: E731
    with torch.no_grad():
        first = circuit.log_prob(x, missing, evidence)
        assert not built()
        torch.testing.assert_close(circuit.log_prob(x, missing, evidence), first)
        assert built()
        circuit.params[key].add_(torch.randn_like(circuit.params[key]))
        changed = circuit.log_prob(x, missing, evidence)
        assert not bool(torch.isclose(changed, first).all())
        torch.testing.assert_close(circuit.log_prob(x, missing, evidence), changed)  # the entry rebuilt, not stale
    with torch.no_grad():
        fresh = circuit.evaluate(LOG_SUM, x, missing, evidence, circuit.tables(circuit._compute_log_tables())).root(circuit)
    torch.testing.assert_close(changed, fresh)


def test_optimizer_step_invalidates_the_cache():
    circuit = _circuit()
    before = _cached(circuit)
    optimizer = torch.optim.Adam(circuit.parameters(), lr=0.5)
    (-circuit.log_prob(X).sum()).backward()
    optimizer.step()
    assert (_cached(circuit) - before).abs().max() > 1e-2
    _assert_fresh(circuit)


def test_em_step_invalidates_the_cache():
    circuit = _circuit()
    before = _cached(circuit)
    m_step(circuit, compute_flows(circuit, X))
    assert (_cached(circuit) - before).abs().max() > 1e-2
    _assert_fresh(circuit)


def test_load_state_dict_invalidates_the_cache():
    circuit, other = _circuit(), pc.compile(pc.structures.hmm(3, 2, 4, seed=5), dtype=torch.float32)
    before = _cached(circuit)
    circuit.load_state_dict(other.state_dict())
    assert (_cached(circuit) - before).abs().max() > 1e-2
    _assert_fresh(circuit)
    torch.testing.assert_close(_cached(circuit), _cached(other), rtol=1e-6, atol=1e-6)


def test_in_place_update_and_saved_load_invalidate_the_cache():
    circuit = _circuit()
    before = _cached(circuit)
    with torch.no_grad():
        next(iter(circuit.params.values())).mul_(3.0)
    assert (_cached(circuit) - before).abs().max() > 1e-2
    _assert_fresh(circuit)
    buffer = io.BytesIO()
    torch.save(_circuit().state_dict(), buffer)
    buffer.seek(0)
    circuit.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(_cached(circuit), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("convert", [lambda c: c.to(torch.float64), lambda c: c.double()])
def test_dtype_and_device_moves_invalidate_the_cache(convert):
    circuit = _circuit()
    _cached(circuit)
    moved = convert(circuit)
    result = _cached(moved)
    assert result.dtype == moved.dtype
    _assert_fresh(moved)


def test_writes_through_data_need_clear_table_cache():
    circuit = _circuit()
    before = _cached(circuit)
    next(iter(circuit.params.values())).data.mul_(3.0)  # bypasses the version counter
    circuit.clear_table_cache()
    assert (_cached(circuit) - before).abs().max() > 1e-2
    _assert_fresh(circuit)


def test_copies_and_pickles_do_not_carry_the_cache():
    circuit = _circuit()
    before = _cached(circuit)
    with torch.no_grad():
        circuit.log_tables()
    assert circuit.runtime.log_entries and circuit.runtime.linear_entries
    clone = copy.deepcopy(circuit)
    assert clone.runtime.log_entries == {} and not clone.runtime.linear_entries
    buffer = io.BytesIO()
    torch.save(circuit, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.runtime.log_entries == {} and not loaded.runtime.linear_entries
    with torch.no_grad():
        next(iter(clone.params.values())).mul_(2.0)
    assert (_cached(clone) - before).abs().max() > 1e-2
    torch.testing.assert_close(_cached(circuit), before, rtol=0, atol=0)
    torch.testing.assert_close(_cached(loaded), before, rtol=1e-6, atol=1e-6)


def test_differentiable_tables_normalise_each_bank_on_first_use_and_linear_tables_from_the_parameters():
    """Under autograd an evaluation normalises only the banks it reads, and a linear table
    comes straight from the parameters (softmax): equal, with equal gradients, to the
    exponentiated log-table."""
    circuit = _circuit()
    tables = circuit.tables()
    assert not tables.cached and not tables.log._memo  # nothing normalised yet
    key = next(k for k in circuit.plan.banks if circuit.plan.banks[k].role == "input")
    linear = tables.linear(key)
    assert key not in tables.log._memo  # the linear table did not go through the log-table
    weights = torch.randn(linear.shape, generator=torch.Generator().manual_seed(0))
    (grad_linear,) = torch.autograd.grad((linear * weights).sum(), circuit.params[key])
    reference = torch.exp(circuit.log_tables()[key])
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), circuit.params[key])
    torch.testing.assert_close(linear, reference)
    torch.testing.assert_close(grad_linear, grad_reference)
    assert set(tables.log) >= set(circuit.plan.banks) and len(tables.log) == len(list(tables.log))


def _emission(circuit: pc.TensorCircuit) -> str:
    return next(k for k, bank in circuit.plan.banks.items() if bank.role == "input")


def test_a_cold_sample_normalises_only_the_rows_it_reads_and_a_reused_version_the_whole_table():
    """After a parameter update, a sample under soft evidence reads the emission log-table
    rows of its chosen nodes only (the whole table is built once a second call asks for the
    same version); draws and node log-probabilities equal those read from the whole table."""
    circuit = pc.compile(pc.structures.hmm(6, 4, 50, seed=0), dtype=torch.float64)
    key = _emission(circuit)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (5, 6), generator=generator)
    missing = torch.rand(5, 6, generator=generator) < 0.5
    soft = torch.randn(5, 6, 50, generator=generator)
    candidates = torch.randint(0, 50, (5, 6, 3), generator=generator)
    with torch.no_grad():
        circuit.params[key].mul_(1.3)  # an optimizer step: every cached table is stale
        cold = circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(1),
                              return_nodes=True)
        cold_log_probs, cold_at = cold.node_log_probs, cold.node_log_probs_at(candidates)
        assert key not in circuit.runtime.log_entries  # only rows were normalised
        warm = circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(1),
                              return_nodes=True)
        assert key in circuit.runtime.log_entries  # the second call at this version built the table
        table = torch.log_softmax(circuit.params[key], dim=-1).reshape(-1, 50)
    assert torch.equal(cold.x, warm.x) and torch.equal(cold.node, warm.node)
    expected = table[cold.node % 4]  # homogeneous HMM: every position reads the one (4, 50) table
    torch.testing.assert_close(cold_log_probs, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(warm.node_log_probs, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(cold_at, expected.gather(2, candidates), rtol=0, atol=1e-12)


def test_node_log_probs_refuse_parameters_changed_since_the_draw():
    circuit = pc.compile(pc.structures.hmm(4, 3, 5, seed=0), dtype=torch.float64)
    with torch.no_grad():
        result = circuit.sample(3, return_nodes=True)
        circuit.params[_emission(circuit)].add_(0.5)
    with pytest.raises(RuntimeError, match="node_log_probs: the circuit's input parameters changed"):
        result.node_log_probs


def test_handed_out_log_tables_keep_their_values_and_internal_tables_reuse_their_buffers():
    """A table returned by ``log_tables`` is never overwritten by a later version; a table
    only an evaluation read is recomputed into the same memory."""
    circuit = pc.compile(pc.structures.hmm(4, 3, 6, seed=0), dtype=torch.float64)
    key = _emission(circuit)
    x = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad():
        handed = circuit.log_tables()[key]
        kept = handed.clone()
        circuit.params[key].add_(0.25)
        internal = circuit.tables().log[key]
        assert internal.data_ptr() != handed.data_ptr()
        circuit.params[key].add_(0.25)
        again = circuit.tables().log[key]
        circuit.log_prob(x)
    assert torch.equal(handed, kept)
    assert again.data_ptr() == internal.data_ptr()
    torch.testing.assert_close(again, torch.log_softmax(circuit.params[key], dim=-1), rtol=0, atol=0)


def test_calls_in_inference_mode_leave_no_buffer_that_later_calls_cannot_write():
    """Tensors made in inference mode cannot be written outside it: queries, gradients and the
    CoDD layer keep working after calls in inference mode, with the same numbers."""
    from diffusion import CoDDLayer

    circuit = pc.compile(pc.structures.hmm(4, 3, 50, seed=0), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (5, 4), generator=g)
    missing = torch.rand(5, 4, generator=g) < 0.5
    soft = torch.randn(5, 4, 50, generator=g, dtype=torch.float64)
    logits = torch.randn(5, 4, 50, generator=g, dtype=torch.float64)
    layer = CoDDLayer(circuit, mask_id=50, gate=2.0)
    x_t = x.masked_fill(missing, 50)

    def run():
        sampled = circuit.sample(x=x, missing=missing, soft_evidence=soft, generator=torch.Generator().manual_seed(1),
                                 return_nodes=True)
        return (sampled.x, sampled.node_log_probs, circuit.log_prob(x, missing=missing, soft_evidence=soft),
                layer(logits, x_t, torch.Generator().manual_seed(2)))

    with torch.inference_mode():
        inside = run()
    with torch.no_grad():
        outside = run()
    for a, b in zip(inside, outside):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    circuit.log_prob(x, missing=missing, soft_evidence=soft).sum().backward()
    assert all(p.grad is not None for p in circuit.parameters())
