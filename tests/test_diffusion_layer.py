"""CoDDLayer and codd_loss against the paper's toy, brute-force enumeration and sampling."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import pclayer as pc
from diffusion import CoDDLayer, codd_loss

NEW, SAN, YORK, DIEGO = 0, 1, 2, 3
MASK = 9
ALWAYS = float("inf")


def toy_circuit() -> pc.TensorCircuit:
    root = pc.structures.hmm(2, 2, 4, initial=[0.5, 0.5], transition=[[1.0, 0.0], [0.0, 1.0]],
                             emission=[[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5]])
    return pc.compile(root, dtype=torch.float64)


def toy_logits() -> torch.Tensor:
    return torch.log(torch.tensor([[[0.59, 0.41, 0.0, 0.0], [0.0, 0.0, 0.56, 0.44]]], dtype=torch.float64))


def random_circuit(window: int, states: int, vocab: int, seed: int) -> pc.TensorCircuit:
    return pc.compile(pc.structures.hmm(window, states, vocab, seed=seed), dtype=torch.float64)


def brute_force(circuit, logits, x_t, temperature=1.0):
    """Dict {x_0 tuple over the w real positions: p_hat} by enumerating V^W."""
    num_vars, vocab = circuit.num_vars, int(circuit.var_cats[0])
    width = len(x_t)
    grid = torch.tensor(list(itertools.product(range(vocab), repeat=num_vars)))
    p_pc = circuit.log_prob(grid).exp().detach()
    logp = torch.log_softmax(logits.double() / temperature, -1)
    weights: dict[tuple, float] = {}
    for row, p in zip(grid.tolist(), p_pc.tolist()):
        head = tuple(row[:width])
        if any(x_t[i] != MASK and head[i] != x_t[i] for i in range(width)):
            continue
        w = p * math.exp(sum(float(logp[i, head[i]]) for i in range(width) if x_t[i] == MASK))
        weights[head] = weights.get(head, 0.0) + w
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def test_toy_product_of_experts_is_exact():
    layer = CoDDLayer(toy_circuit(), mask_id=MASK, gate=ALWAYS)
    x_t = torch.tensor([[MASK, MASK]])
    pairs = torch.tensor([[NEW, YORK], [SAN, DIEGO], [NEW, DIEGO], [SAN, YORK]])
    p = layer.log_prob(pairs, toy_logits().expand(4, -1, -1), x_t.expand(4, -1)).exp()
    assert p[0].item() == pytest.approx(0.6468, abs=5e-5)
    assert p[1].item() == pytest.approx(0.3532, abs=5e-5)
    assert p[0].item() == pytest.approx(0.59 * 0.56 / (0.59 * 0.56 + 0.41 * 0.44), rel=1e-12)
    assert p[2].item() == 0.0 and p[3].item() == 0.0


def test_toy_marginal_mode():
    layer = CoDDLayer(toy_circuit(), mask_id=MASK, gate=ALWAYS, mode="marginal")
    out = layer(toy_logits(), torch.tensor([[MASK, MASK]])).exp()[0]
    expected = 0.59 * 0.56 / (0.59 * 0.56 + 0.41 * 0.44)
    assert out[0, NEW].item() == pytest.approx(expected, rel=1e-10)
    assert out[1, DIEGO].item() == pytest.approx(1 - expected, rel=1e-10)
    assert out[0, YORK].item() == 0.0


@pytest.mark.parametrize("mode", ["latent", "sample"])
def test_toy_samples_follow_the_product(mode):
    n = 4000
    layer = CoDDLayer(toy_circuit(), mask_id=MASK, gate=ALWAYS, mode=mode)
    out = layer(toy_logits().expand(n, -1, -1), torch.full((n, 2), MASK), torch.Generator().manual_seed(0))
    tokens = out.argmax(-1)  # the host's greedy choice
    coherent_ny = ((tokens[:, 0] == NEW) & (tokens[:, 1] == YORK)).sum().item()
    coherent_sd = ((tokens[:, 0] == SAN) & (tokens[:, 1] == DIEGO)).sum().item()
    assert coherent_ny + coherent_sd == n
    p = 0.59 * 0.56 / (0.59 * 0.56 + 0.41 * 0.44)
    assert chisquare([coherent_ny, coherent_sd], [n * p, n * (1 - p)]).pvalue > 1e-3


def test_toy_temperature_sharpens_backbone_term_only():
    layer = CoDDLayer(toy_circuit(), mask_id=MASK, gate=ALWAYS, temperature=0.5)
    p = layer.log_prob(torch.tensor([[NEW, YORK]]), toy_logits(), torch.tensor([[MASK, MASK]])).exp().item()
    assert p == pytest.approx(0.7703, abs=5e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_one_state_uniform_circuit_reproduces_backbone(temperature):
    vocab, window = 7, 4
    root = pc.structures.hmm(window, 1, vocab, emission=torch.full((1, vocab), 1.0 / vocab))
    circuit = pc.compile(root, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, window, vocab, generator=g, dtype=torch.float64) * 3
    x_0 = torch.randint(0, vocab, (3, window), generator=g)
    x_t = x_0.clone()
    x_t[0, :2] = MASK
    x_t[1, 1:] = MASK
    x_t[2, 3] = MASK
    masked = x_t == MASK
    base = torch.log_softmax(logits / temperature, -1)
    latent = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, temperature=temperature)(logits, x_t)
    assert torch.allclose(latent[masked], (base - math.log(vocab))[masked], atol=1e-12)
    assert torch.equal(latent[~masked], logits[~masked])
    marginal = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, temperature=temperature, mode="marginal")(logits, x_t)
    assert torch.allclose(marginal[masked], base[masked], atol=1e-10)
    layer = CoDDLayer(circuit, mask_id=MASK, temperature=temperature)
    token_nll = -base.gather(-1, x_0.unsqueeze(-1)).squeeze(-1)
    per_row = (token_nll * masked).sum(1) / masked.sum(1)
    assert torch.allclose(layer.log_prob(x_0, logits, x_t), -(token_nll * masked).sum(1), atol=1e-12)
    assert codd_loss(layer, x_0, logits, x_t).item() == pytest.approx(per_row.mean().item(), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.integers(1, 3), temperature=st.sampled_from([1.0, 0.5, 2.0]),
       mask_bits=st.lists(st.booleans(), min_size=3, max_size=3))
def test_log_prob_and_marginals_match_brute_force(seed, width, temperature, mask_bits):
    vocab, window = 3, 3
    circuit = random_circuit(window, 2, vocab, seed)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, width, vocab, generator=g, dtype=torch.float64) * 2
    x_t = torch.randint(0, vocab, (1, width), generator=g)
    x_t[0, torch.tensor(mask_bits[:width])] = MASK
    exact = brute_force(circuit, logits[0], x_t[0].tolist(), temperature)
    layer = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, temperature=temperature, mode="marginal")
    states = torch.tensor(list(exact))
    log_p = layer.log_prob(states, logits.expand(len(states), -1, -1), x_t.expand(len(states), -1))
    assert torch.allclose(log_p.exp(), torch.tensor(list(exact.values()), dtype=torch.float64), atol=1e-10)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-10)
    out = layer(logits, x_t)
    for i in range(width):
        if x_t[0, i] != MASK:
            assert torch.equal(out[0, i], logits[0, i])
            continue
        marg = torch.zeros(vocab, dtype=torch.float64)
        for key, p in exact.items():
            marg[key[i]] += p
        assert torch.allclose(out[0, i].exp(), marg, atol=1e-10)


def test_exact_joint_samples_chi_square():
    vocab, window, n = 3, 2, 6000
    circuit = random_circuit(window, 3, vocab, seed=3)
    logits = torch.randn(1, window, vocab, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_t = torch.full((1, window), MASK)
    exact = brute_force(circuit, logits[0], x_t[0].tolist())
    layer = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, mode="sample")
    out = layer(logits.expand(n, -1, -1), x_t.expand(n, -1), torch.Generator().manual_seed(5))
    assert bool((out.exp().sum(-1) == 1).all())
    tokens = out.argmax(-1)
    keys = list(exact)
    counts = [int(((tokens[:, 0] == a) & (tokens[:, 1] == b)).sum()) for a, b in keys]
    assert chisquare(counts, [n * exact[k] for k in keys]).pvalue > 1e-3


def test_latent_mode_node_posterior_chi_square():
    """With deterministic emissions per state block, the latent path is identified by the
    greedy token; its frequency must follow the exact posterior of the product."""
    vocab, n = 4, 6000
    emission = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.4, 0.6]])
    root = pc.structures.hmm(2, 2, vocab, initial=[0.3, 0.7], transition=[[0.8, 0.2], [0.5, 0.5]], emission=emission)
    circuit = pc.compile(root, dtype=torch.float64)
    logits = torch.randn(1, 2, vocab, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_t = torch.full((1, 2), MASK)
    exact = brute_force(circuit, logits[0], x_t[0].tolist())
    block = lambda token: 0 if token < 2 else 1  # noqa: E731
    path_p = {}
    for (a, b), p in exact.items():
        path_p[(block(a), block(b))] = path_p.get((block(a), block(b)), 0.0) + p
    layer = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, mode="latent")
    out = layer(logits.expand(n, -1, -1), x_t.expand(n, -1), torch.Generator().manual_seed(9))
    paths = (out.argmax(-1) >= 2).long()
    keys = list(path_p)
    counts = [int(((paths[:, 0] == a) & (paths[:, 1] == b)).sum()) for a, b in keys]
    assert sum(counts) == n
    assert chisquare(counts, [n * path_p[k] for k in keys]).pvalue > 1e-3


def test_latent_mode_adds_a_chosen_nodes_emission_row_and_reuses_no_returned_memory():
    """Each masked position's latent logits are the tempered backbone log-probabilities plus
    the log emission row of one hidden state (distinct rows here), whatever the call before
    (the layer reuses its evidence buffers, never the returned tensors)."""
    vocab, states = 5, 3
    emission = torch.softmax(torch.randn(states, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    root = pc.structures.hmm(4, states, vocab, emission=emission, seed=1)
    circuit = pc.compile(root, dtype=torch.float64)
    layer = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, temperature=0.7, mode="latent")
    g = torch.Generator().manual_seed(3)
    x_t = torch.tensor([[MASK, 2, MASK, MASK], [1, MASK, 0, 4]])
    first_logits, second_logits = (torch.randn(2, 4, vocab, generator=g, dtype=torch.float64) for _ in range(2))
    first = layer(first_logits, x_t, g)
    kept = first.clone()
    second = layer(second_logits, x_t, g)
    assert torch.equal(first, kept)
    for logits, out in ((first_logits, first), (second_logits, second)):
        masked = x_t == MASK
        added = (out - torch.log_softmax(logits / 0.7, -1))[masked]  # (masked positions, V)
        distance = (added.unsqueeze(1) - emission.log().unsqueeze(0)).abs().amax(-1)  # to each state's row
        assert bool((distance.amin(1) < 1e-12).all())
        assert torch.equal(out[~masked], logits[~masked])


def test_any_order_fixes_greedily_in_confidence_order():
    vocab, window = 3, 3
    circuit = random_circuit(window, 2, vocab, seed=11)
    logits = torch.randn(1, window, vocab, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    x_t = torch.tensor([[MASK, 1, MASK]])
    layer = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, mode="any_order")
    out = layer(logits, x_t)
    free, fixed = [0, 2], dict()
    exact = brute_force(circuit, logits[0], x_t[0].tolist())
    while free:
        conditional = {k: p for k, p in exact.items() if all(k[i] == v for i, v in fixed.items())}
        total = sum(conditional.values())
        best = None
        for i in free:
            marg = torch.zeros(vocab, dtype=torch.float64)
            for key, p in conditional.items():
                marg[key[i]] += p / total
            if best is None or marg.max() > best[1].max():
                best = (i, marg)
        i, marg = best
        assert torch.allclose(out[0, i].exp(), marg, atol=1e-10)
        fixed[i] = int(marg.argmax())
        free.remove(i)
    assert torch.equal(out[0, 1], logits[0, 1])


def test_gate_is_per_row_and_strict():
    circuit = random_circuit(4, 2, 3, seed=0)
    logits = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = torch.tensor([[MASK, 0, 1, 2], [MASK, MASK, 1, 2], [MASK, MASK, MASK, 2]])  # ratios .25, .5, .75
    out = CoDDLayer(circuit, mask_id=MASK, gate=0.5, mode="marginal")(logits, x_t)
    assert not torch.allclose(out[0, 0], logits[0, 0])
    assert torch.equal(out[1], logits[1])  # ratio == gate: not applied (strict <)
    assert torch.equal(out[2], logits[2])
    alone = CoDDLayer(circuit, mask_id=MASK, gate=0.5, mode="marginal")(logits[:1], x_t[:1])
    assert torch.allclose(out[0], alone[0])
    assert torch.equal(CoDDLayer(circuit, mask_id=MASK, gate=0.8, mode="marginal")(logits, x_t)[2, 3], logits[2, 3])


def test_partial_window_sums_out_missing_positions():
    circuit = random_circuit(4, 3, 3, seed=5)
    logits = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x_t = torch.tensor([[MASK, MASK]])
    exact = brute_force(circuit, logits[0], [MASK, MASK])
    layer = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, mode="marginal")
    states = torch.tensor(list(exact))
    log_p = layer.log_prob(states, logits.expand(len(states), -1, -1), x_t.expand(len(states), -1))
    assert torch.allclose(log_p.exp(), torch.tensor(list(exact.values()), dtype=torch.float64), atol=1e-10)
    assert layer(logits, x_t).shape == (1, 2, 3)


def test_top_k_equals_full_layer_on_truncated_logits():
    vocab = 6
    circuit = random_circuit(3, 2, vocab, seed=8)
    logits = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x_t = torch.tensor([[MASK, 2, MASK], [MASK, MASK, MASK]])
    x_0 = torch.tensor([[0, 2, 1], [3, 4, 5]])
    top = logits.topk(2, -1)
    truncated = torch.full_like(logits, -torch.inf).scatter(-1, top.indices, top.values)
    for mode in ("marginal", "latent"):
        k_layer = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, mode=mode, top_k=2)
        full = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS, mode=mode)
        a = k_layer(logits, x_t, torch.Generator().manual_seed(1))
        b = full(truncated, x_t, torch.Generator().manual_seed(1))
        masked = (x_t == MASK).unsqueeze(-1).expand_as(a)
        assert torch.allclose(a[masked], b[masked], atol=1e-12, equal_nan=False)
    x_0_in = torch.where(x_t == MASK, top.indices[..., 0], x_t)
    assert torch.allclose(k_layer.log_prob(x_0_in, logits, x_t), full.log_prob(x_0_in, truncated, x_t), atol=1e-12)
    assert torch.allclose(CoDDLayer(circuit, mask_id=MASK, top_k=vocab).log_prob(x_0, logits, x_t),
                          CoDDLayer(circuit, mask_id=MASK).log_prob(x_0, logits, x_t), atol=1e-12)


def test_loss_gradient_flows_to_circuit_parameters():
    circuit = random_circuit(3, 2, 4, seed=1)
    layer = CoDDLayer(circuit, mask_id=MASK)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_0 = torch.tensor([[0, 1, 2], [3, 3, 3]])
    x_t = torch.tensor([[MASK, 1, MASK], [3, MASK, 3]])
    loss = codd_loss(layer, x_0, logits, x_t)
    loss.backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    weighted = codd_loss(layer, x_0, logits, x_t, weight=torch.tensor([1.0, 0.0], dtype=torch.float64))
    only_first = -layer.log_prob(x_0[:1], logits[:1], x_t[:1]) / 6
    assert weighted.item() == pytest.approx(only_first.item(), rel=1e-12)


def test_bad_inputs_are_named():
    circuit = random_circuit(3, 2, 4, seed=1)
    layer = CoDDLayer(circuit, mask_id=MASK, gate=ALWAYS)
    logits = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="mode"):
        CoDDLayer(circuit, mask_id=MASK, mode="joint")
    with pytest.raises(ValueError, match="temperature"):
        CoDDLayer(circuit, mask_id=MASK, temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        layer(torch.zeros(1, 4, 4), torch.full((1, 4), MASK))
    with pytest.raises(ValueError, match="logits"):
        layer(torch.zeros(1, 3, 5), torch.full((1, 3), MASK))
    with pytest.raises(ValueError, match="x_t"):
        layer(logits, torch.tensor([[MASK, 7, 0]]))
    with pytest.raises(ValueError, match="logits: NaN"):
        layer(torch.full((1, 3, 4), math.nan), torch.full((1, 3), MASK))
    with pytest.raises(ValueError, match="x_0"):
        layer.log_prob(torch.tensor([[0, 1, 2]]), logits, torch.tensor([[MASK, 2, MASK]]))
    with pytest.raises(ValueError, match="weight"):
        codd_loss(layer, torch.tensor([[0, 1, 2]]), logits, torch.tensor([[MASK, 1, MASK]]), weight=torch.tensor([-1.0]))
