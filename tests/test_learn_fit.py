"""Gradient learning and the ``fit`` loop."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import pclayer as pc
from pclayer.learn import FullBatchEM, fit

F64 = torch.float64


def _bayes_net(seed: int) -> pc.NodeGroup:
    """p(x0) p(x1 | x0) with indicator leaves: no hidden variables, so the likelihood
    has one maximum (the empirical conditional frequencies)."""
    g = torch.Generator().manual_seed(seed)
    x0 = pc.inputs(0, 3, pc.Indicator(3))
    x1 = pc.inputs(1, 4, pc.Indicator(4))
    conditionals = pc.summate(x1, num_nodes=3, generator=g)
    return pc.summate(pc.multiply(x0, conditionals), num_nodes=1, generator=g)


def _bayes_net_data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x0 = torch.multinomial(torch.tensor([0.2, 0.5, 0.3]), n, replacement=True, generator=g)
    table = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1]])
    x1 = torch.multinomial(table[x0], 1, generator=g).squeeze(1)
    return torch.stack([x0, x1], dim=1)


def test_adam_reaches_the_em_optimum():
    x = _bayes_net_data(300)
    em_circuit = pc.compile(_bayes_net(0), dtype=F64)
    em = FullBatchEM(em_circuit)
    em.accumulate(x)
    em.step()  # no hidden variables: one M-step is the maximum-likelihood estimate
    em_ll = float(em_circuit.log_prob(x).detach().mean())
    adam_circuit = pc.compile(_bayes_net(1), dtype=F64)
    optimizer = torch.optim.Adam(adam_circuit.parameters(), lr=0.2)
    for _ in range(200):
        optimizer.zero_grad()
        loss = -adam_circuit.log_prob(x).mean()
        loss.backward()
        optimizer.step()
    adam_ll = float(adam_circuit.log_prob(x).detach().mean())
    assert adam_ll == pytest.approx(em_ll, abs=1e-7)
    for key, table in em_circuit.log_tables().items():
        torch.testing.assert_close(torch.exp(adam_circuit.log_tables()[key]), torch.exp(table), atol=1e-3, rtol=0)


def test_fit_with_adam_approaches_the_em_optimum():
    x = _bayes_net_data(300)
    reference = pc.compile(_bayes_net(0), dtype=F64)
    fit(reference, x, epochs=1, batch_size=300, method="em", progress=False)
    circuit = pc.compile(_bayes_net(2), dtype=F64)
    history = fit(circuit, x, epochs=30, batch_size=100, method="adam", lr=0.1, progress=False)
    assert history.train_ll[-1] == pytest.approx(float(reference.log_prob(x).detach().mean()), abs=2e-3)


def test_log_prob_is_differentiable_in_parameters_and_soft_evidence():
    circuit = pc.compile(pc.structures.hmm(3, 2, 3, seed=0), dtype=F64)
    x = torch.tensor([[0, 1, 2], [2, 2, 0]])
    evidence = torch.randn(2, 3, 3, dtype=F64, requires_grad=True)
    params = list(circuit.parameters())
    torch.autograd.gradcheck(lambda e, *p: circuit.log_prob(x, soft_evidence=e), (evidence, *params))


def test_fit_em_history_is_monotone_and_summarised(capsys):
    circuit = pc.compile(pc.structures.hmm(5, 3, 4, seed=1), dtype=F64)
    x = pc.compile(pc.structures.hmm(5, 3, 4, seed=2)).sample(200, generator=torch.Generator().manual_seed(0))
    history = fit(circuit, x, epochs=6, batch_size=64, method="em")
    assert len(history.train_ll) == 6 and history.valid_ll == []
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(history.train_ll))
    assert "fit (em): 6 epochs" in capsys.readouterr().err + history.summary()


def test_minibatch_em_improves_the_likelihood():
    circuit = pc.compile(pc.structures.hmm(5, 3, 4, seed=1), dtype=F64)
    x = pc.compile(pc.structures.hmm(5, 3, 4, seed=2)).sample(200, generator=torch.Generator().manual_seed(0))
    before = float(circuit.log_prob(x).detach().mean())
    history = fit(circuit, x, epochs=3, batch_size=50, method="minibatch_em", step_size=0.3, progress=False)
    assert history.train_ll[-1] > before + 0.05


def test_early_stopping_restores_the_best_validation_parameters():
    circuit = pc.compile(pc.structures.hmm(4, 4, 6, seed=3), dtype=F64)
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 6, (12, 4), generator=g)  # tiny: EM overfits it
    valid = torch.randint(0, 6, (200, 4), generator=g)
    history = fit(circuit, train, epochs=60, batch_size=12, method="em", valid_x=valid, patience=3, progress=False)
    assert history.stopped_early and len(history.train_ll) < 60
    assert history.best_epoch == max(range(len(history.valid_ll)), key=history.valid_ll.__getitem__)
    assert len(history.valid_ll) == history.best_epoch + 4
    assert float(circuit.log_prob(valid).detach().mean()) == pytest.approx(history.valid_ll[history.best_epoch], abs=1e-12)


def test_valid_fraction_splits_the_data_reproducibly():
    x = pc.compile(pc.structures.hmm(4, 2, 3, seed=0)).sample(50, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        circuit = pc.compile(pc.structures.hmm(4, 2, 3, seed=5), dtype=F64)
        runs.append(fit(circuit, x, epochs=2, batch_size=16, valid_fraction=0.2, progress=False))
    assert runs[0] == runs[1] and len(runs[0].valid_ll) == 2


def test_fit_accepts_missing_values_and_weights():
    circuit = pc.compile(pc.structures.hmm(4, 2, 3, seed=0), dtype=F64)
    twin = copy.deepcopy(circuit)
    x = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2], [2, 0, 1, 1]])
    missing = torch.tensor([[False, True, False, False], [False] * 4, [True, False, False, True]])
    fit(circuit, x, missing=missing, weights=torch.tensor([1.0, 2.0, 0.5], dtype=F64), epochs=1, batch_size=2, progress=False)
    em = FullBatchEM(twin)
    em.accumulate(x, missing, weights=torch.tensor([1.0, 2.0, 0.5], dtype=F64))
    em.step()
    for key in circuit.params:
        torch.testing.assert_close(circuit.params[key], twin.params[key])


def test_fit_rejects_bad_arguments():
    circuit = pc.compile(pc.structures.hmm(3, 2, 2, seed=0))
    x = torch.zeros(10, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="method: expected one of"):
        fit(circuit, x, epochs=1, batch_size=4, method="sgd")
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        fit(circuit, x, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="patience"):
        fit(circuit, x, epochs=1, batch_size=4, patience=2)
    with pytest.raises(ValueError, match="valid_fraction"):
        fit(circuit, x, epochs=1, batch_size=4, valid_fraction=1.0)
    with pytest.raises(ValueError, match="x: value 5"):
        fit(circuit, x + 5, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="distributed: fit supports method='em'"):
        fit(circuit, x, epochs=1, batch_size=4, method="adam", distributed=True)


# Issue 12, point 12: empty data and rows without information.


@pytest.mark.parametrize("method", ["em", "minibatch_em", "adam"])
def test_empty_data_gives_one_clear_error_for_every_method(method):
    circuit = pc.compile(_bayes_net(0), dtype=F64)
    empty = torch.zeros(0, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x: expected at least one row of data"):
        fit(circuit, empty, epochs=1, batch_size=4, method=method, progress=False)
    with pytest.raises(ValueError, match=r"valid_x: expected at least one row of data"):
        fit(circuit, _bayes_net_data(10), valid_x=empty, epochs=1, batch_size=4, method=method, progress=False)


def test_adam_skips_rows_where_every_value_is_missing():
    x = _bayes_net_data(40)
    missing = torch.zeros_like(x, dtype=torch.bool)
    missing[20:] = True  # the second half carries no information
    reference = pc.compile(_bayes_net(0), dtype=F64)
    fit(reference, x[:20], epochs=3, batch_size=40, method="adam", lr=0.1, progress=False)
    circuit = pc.compile(_bayes_net(0), dtype=F64)
    fit(circuit, x, missing=missing, epochs=3, batch_size=40, method="adam", lr=0.1, progress=False)
    for key, value in reference.params.items():
        torch.testing.assert_close(circuit.params[key], value, rtol=1e-12, atol=1e-12)
    untouched = pc.compile(_bayes_net(0), dtype=F64)
    fit(untouched, x[20:], missing=missing[20:], epochs=3, batch_size=8, method="adam", lr=0.1, progress=False)
    for key, value in pc.compile(_bayes_net(0), dtype=F64).params.items():
        assert torch.equal(untouched.params[key], value)


def test_a_vocabulary_sized_table_under_evidence_has_exact_gradients_in_parameters_and_evidence():
    """One emission table much bigger than what a batch reads, soft evidence and missing
    values: the path that reads observed entries and missing-row marginals of the table in
    one operation, with the row-softmax gradient computed in place."""
    circuit = pc.compile(pc.structures.hmm(3, 2, 50, seed=0), dtype=F64)
    x = torch.tensor([[0, 17, 49], [3, 3, 0]])
    missing = torch.tensor([[True, False, False], [False, True, True]])
    evidence = torch.randn(2, 3, 50, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    params = list(circuit.parameters())
    for gone in (missing, torch.zeros_like(missing), torch.ones_like(missing)):  # mixed, no missing row, all missing
        torch.autograd.gradcheck(lambda e, *p: circuit.log_prob(x, missing=gone, soft_evidence=e), (evidence, *params))


def test_two_forwards_share_one_backward_and_parameter_changes_before_it_raise():
    circuit = pc.compile(pc.structures.hmm(3, 2, 50, seed=0), dtype=F64)
    x = torch.tensor([[0, 17, 49], [3, 3, 0]])
    missing = torch.tensor([[True, False, False], [False, True, True]])
    evidence = torch.randn(2, 3, 50, dtype=F64, generator=torch.Generator().manual_seed(0))
    separate = []
    for _ in range(2):
        circuit.zero_grad(set_to_none=True)
        circuit.log_prob(x, missing=missing, soft_evidence=evidence).sum().backward()
        separate.append({k: p.grad.clone() for k, p in circuit.named_parameters()})
    circuit.zero_grad(set_to_none=True)
    first = circuit.log_prob(x, missing=missing, soft_evidence=evidence).sum()
    second = circuit.log_prob(x, missing=missing, soft_evidence=evidence).sum()
    (first + second).backward()
    for name, p in circuit.named_parameters():
        torch.testing.assert_close(p.grad, separate[0][name] + separate[1][name], rtol=1e-12, atol=1e-12)
    loss = circuit.log_prob(x, missing=missing, soft_evidence=evidence).sum()
    with torch.no_grad():
        next(iter(circuit.parameters())).mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_top_k_evidence_on_a_vocabulary_sized_table_has_the_dense_evidences_gradients():
    """Under autograd, top-k evidence on one big table reads only the candidates' and the
    observed values' columns (repeated across rows here); its gradients in the parameters
    and the evidence values equal those of the same evidence given densely."""
    circuit = pc.compile(pc.structures.hmm(3, 2, 50, seed=0), dtype=F64)
    g = torch.Generator().manual_seed(1)
    x = torch.tensor([[0, 17, 49], [3, 3, 0]])
    missing = torch.tensor([[True, False, True], [False, True, True]])
    indices = torch.stack([torch.randperm(50, generator=g)[:4] for _ in range(6)]).view(2, 3, 4)
    indices[1, 2] = indices[0, 0]  # the same candidates in two rows
    indices[0, 1, 0], indices[1, 0, 0] = 17, 3  # the observed values among their candidates (else probability 0)
    indices[1, 0, 1:] = torch.tensor([5, 6, 7])
    values = torch.randn(2, 3, 4, dtype=F64, generator=g, requires_grad=True)
    free = torch.tensor([[False, False, True], [False, False, False]])
    params = list(circuit.parameters())

    def grads(evidence):
        circuit.zero_grad(set_to_none=True)
        total = circuit.log_prob(x, missing=missing, soft_evidence=evidence).sum()
        return torch.autograd.grad(total, [values, *params])

    sparse = grads(pc.TopKEvidence(values, indices, free))
    dense = grads(pc.TopKEvidence(values, indices, free).to_dense(50))
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.autograd.gradcheck(lambda v, *p: circuit.log_prob(x, missing=missing, soft_evidence=pc.TopKEvidence(v, indices, free)),
                             (values, *params))
