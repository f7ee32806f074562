"""generate(), remasking rules, windows and the backbone adapters on tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import pclayer as pc
from diffusion import CoDDLayer, adapters, generate
from diffusion.sampling import confidence, gumbel_argmax, top_positions, transfer_counts
from diffusion.windows import covering_starts

VOCAB, MASK = 6, 6


class TinyModel(nn.Module):
    """Random embedding + linear: logits (B, L, V + extra) with an ``.logits`` output object."""

    def __init__(self, vocab: int, extra: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab + 1, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, vocab + extra)

    def forward(self, x, attention_mask=None, position_ids=None):
        h = self.embed(x)
        h = h + torch.tanh(self.mix(h.mean(1, keepdim=True)))
        return SimpleNamespace(logits=self.out(h))


def fixed_model(table: torch.Tensor):
    """A 'model' returning the same per-position logits (L, V) for every input."""
    return lambda x: table[: x.shape[1]].expand(x.shape[0], -1, -1).clone()


def test_adapters_on_tiny_random_model():
    model = TinyModel(VOCAB)
    x = torch.tensor([[0, 1, MASK, MASK, 2]])
    raw = model(x).logits
    assert torch.equal(adapters.llada_logits(model)(x), raw)
    dream = adapters.dream_logits(model)(x)
    assert torch.equal(dream[:, 0], raw[:, 0]) and torch.equal(dream[:, 1:], raw[:, :-1])
    mdlm_model = TinyModel(VOCAB, extra=1)
    mdlm = adapters.mdlm_logits(lambda x, sigma: torch.log_softmax(mdlm_model(x).logits, -1), mask_index=VOCAB,
                                vocab_size=VOCAB)(x)
    assert mdlm.shape == (1, 5, VOCAB)
    with pytest.raises(ValueError, match="mask_index"):
        adapters.mdlm_logits(lambda x, sigma: mdlm_model(x).logits, mask_index=2, vocab_size=VOCAB)(x)
    with pytest.raises(ValueError, match="fn"):
        adapters.callable_logits(lambda x: x.float())(x)
    for fn in (adapters.llada_logits(model), adapters.dream_logits(model), adapters.callable_logits(lambda x: model(x).logits)):
        out = generate(fn, torch.tensor([[0, 1]]), gen_length=4, block_length=2, steps=4, mask_id=MASK)
        assert out.shape == (1, 6) and not bool((out == MASK).any()) and out[0, :2].tolist() == [0, 1]
    mdlm_fn = adapters.mdlm_logits(lambda x, sigma: torch.log_softmax(mdlm_model(x).logits, -1), mask_index=VOCAB,
                                   vocab_size=VOCAB)
    out = generate(mdlm_fn, torch.tensor([[0, 1]]), gen_length=4, block_length=4, steps=2, mask_id=VOCAB)
    assert not bool((out == VOCAB).any())


def test_dream_hook_applies_layer_at_first_masked_window():
    circuit = pc.compile(pc.structures.hmm(2, 2, VOCAB, seed=0), dtype=torch.float64)
    layer = CoDDLayer(circuit, mask_id=MASK, gate=float("inf"), mode="marginal")
    hook = adapters.dream_logits_hook(layer)
    x = torch.tensor([[0, 1, MASK, MASK, 2]])
    logits = torch.randn(1, 5, VOCAB, dtype=torch.float64)
    out = hook(0, x, logits)
    assert torch.equal(out[:, [0, 1, 4]], logits[:, [0, 1, 4]])
    assert torch.allclose(out[:, 2:4], layer(logits[:, 2:4], x[:, 2:4]))


def test_remasking_rules():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.9, 0.05, 0.05]]]))
    tokens = torch.tensor([[1, 0, 0]])
    assert torch.allclose(confidence(logits, tokens, "low_confidence"), torch.tensor([[0.3, 0.4, 0.9]], dtype=torch.float64))
    assert torch.allclose(confidence(logits, tokens, "topprob"), torch.tensor([[0.5, 0.4, 0.9]], dtype=torch.float64))
    assert torch.allclose(confidence(logits, tokens, "margin"), torch.tensor([[0.2, 0.0, 0.85]], dtype=torch.float64))
    entropy = confidence(logits, tokens, "entropy")
    assert entropy[0, 2] > entropy[0, 0] > entropy[0, 1]
    r = confidence(logits, tokens, "random", torch.Generator().manual_seed(0))
    assert r.shape == (1, 3) and bool(((r >= 0) & (r < 1)).all())
    with pytest.raises(ValueError, match="remasking"):
        confidence(logits, tokens, "loud")
    assert confidence(torch.tensor([[[0.0, -torch.inf]]]), torch.tensor([[0]]), "entropy").item() == 0.0


def test_gumbel_argmax_greedy_and_distribution():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]])).expand(1, 20000, 3)
    assert bool((gumbel_argmax(logits, 0.0) == 0).all())
    draws = gumbel_argmax(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.flatten(), minlength=3).double() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.015)


def test_schedule_and_top_positions():
    counts = transfer_counts(torch.tensor([[True] * 7, [True] * 4 + [False] * 3]), 3)
    assert counts.tolist() == [[3, 2, 2], [2, 1, 1]]
    chosen = top_positions(torch.tensor([[0.1, 0.9, 0.5, -torch.inf]]), torch.tensor([2]))
    assert chosen.tolist() == [[False, True, True, False]]
    starts = covering_starts(torch.tensor([[False, False, True, False, True, True, False, False]]), 0, 8, 3)
    assert starts.tolist() == [2]  # first of the best spans


def test_low_confidence_commits_most_confident_first():
    probs = torch.tensor([[0.4, 0.3, 0.3, 0, 0, 0], [0, 0.9, 0.1, 0, 0, 0], [0, 0, 0.6, 0.4, 0, 0]])
    calls = []
    table = torch.log(torch.cat([torch.full((1, VOCAB), 1.0 / VOCAB), probs]))

    def model(x):
        calls.append(x.clone())
        return fixed_model(table)(x)

    out = generate(model, torch.tensor([[5]]), gen_length=3, block_length=3, steps=3, mask_id=MASK)
    assert out.tolist() == [[5, 0, 1, 2]]
    assert calls[1].tolist() == [[5, MASK, 1, MASK]] and calls[2].tolist() == [[5, MASK, 1, 2]]


def test_layer_makes_greedy_decoding_coherent():
    # X: New .6 / San .4, Y: York .45 / Diego .55: the factorised greedy choice "New Diego" is incoherent.
    new, san, york, diego = 0, 1, 2, 3
    table = torch.log(torch.tensor([[1 / 6] * 6, [0.6, 0.4, 0, 0, 0, 0], [0, 0, 0.45, 0.55, 0, 0]], dtype=torch.float64))
    model = fixed_model(table)
    emission = torch.tensor([[0.5, 0, 0.5, 0, 0, 0], [0, 0.5, 0, 0.5, 0, 0]])
    root = pc.structures.hmm(2, 2, VOCAB, initial=[0.5, 0.5], transition=[[1.0, 0.0], [0.0, 1.0]], emission=emission)
    layer = CoDDLayer(pc.compile(root, dtype=torch.float64), mask_id=MASK, gate=float("inf"))
    prompt = torch.tensor([[5]])
    plain = generate(model, prompt, gen_length=2, block_length=2, steps=1, mask_id=MASK)
    assert plain[0, 1:].tolist() == [new, diego]
    pairs = set()
    for seed in range(40):
        out = generate(model, prompt, gen_length=2, block_length=2, steps=1, layer=layer, generator=torch.Generator().manual_seed(seed))
        pairs.add(tuple(out[0, 1:].tolist()))
    assert pairs == {(new, york), (san, diego)}
    with pytest.warns(UserWarning, match="disabled the CoDD layer"):
        gated = generate(model, prompt, gen_length=2, block_length=2, steps=1, layer=layer, gate=0.5)
    assert gated[0, 1:].tolist() == [new, diego]


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy", "topprob"])
def test_full_diffusion_window_and_partial_blocks(remasking):
    circuit = pc.compile(pc.structures.hmm(4, 3, VOCAB, seed=1), dtype=torch.float32)
    layer = CoDDLayer(circuit, mask_id=MASK, gate=float("inf"), mode="latent")
    model = adapters.llada_logits(TinyModel(VOCAB))
    prompt = torch.tensor([[0, 1], [2, 3]])
    g = torch.Generator().manual_seed(0)
    full = generate(model, prompt, gen_length=12, block_length=12, steps=6, layer=layer, remasking=remasking,
                    temperature=0.5, generator=g)
    short = generate(model, prompt, gen_length=6, block_length=3, steps=6, layer=layer, remasking=remasking, generator=g)
    for out in (full, short):
        assert not bool((out == MASK).any()) and torch.equal(out[:, :2], prompt)


def test_generate_rejects_bad_arguments():
    model = fixed_model(torch.zeros(8, VOCAB))
    with pytest.raises(ValueError, match="block_length"):
        generate(model, torch.tensor([[0]]), gen_length=5, block_length=2, steps=5, mask_id=MASK)
    with pytest.raises(ValueError, match="steps"):
        generate(model, torch.tensor([[0]]), gen_length=4, block_length=2, steps=3, mask_id=MASK)
    with pytest.raises(ValueError, match="mask_id"):
        generate(model, torch.tensor([[0]]), gen_length=4, block_length=2, steps=2)
    with pytest.raises(ValueError, match="model"):
        generate(lambda x: torch.zeros(1, 2, 3), torch.tensor([[0]]), gen_length=4, block_length=2, steps=2, mask_id=MASK)
