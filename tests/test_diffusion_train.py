"""train_codd, the noising process, and the save/load of a layer directory."""

from __future__ import annotations

import json

import pytest
import torch

import pclayer as pc
from diffusion import CoDDLayer, from_pretrained, save_pretrained, train_codd
from diffusion.train import noise, windowed_loss

VOCAB, MASK = 4, 4


def pair_data(rows: int, seed: int) -> torch.Tensor:
    """Sequences of 4 tokens made of two repeated pairs (a, a, b, b): strong pair coupling."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, VOCAB, (rows, 2), generator=g)
    return a.repeat_interleave(2, dim=1)


def uniform_backbone(x: torch.Tensor) -> torch.Tensor:
    """A factorised backbone that only copies visible tokens' marginals: uniform logits."""
    return torch.zeros(*x.shape, VOCAB)


def test_noise_masks_only_response_tokens():
    x_0 = torch.arange(8).repeat(500, 1) % VOCAB
    prompt = torch.zeros_like(x_0, dtype=torch.bool)
    prompt[:, :3] = True
    x_t, p = noise(x_0, ~prompt, MASK, 1e-3, torch.Generator().manual_seed(0))
    assert not bool((x_t[:, :3] == MASK).any())
    assert torch.equal(torch.where(x_t == MASK, x_0, x_t), x_0)
    ratio = (x_t[:, 3:] == MASK).double().mean(1)
    assert abs(float((ratio - p).mean())) < 0.02 and float(p.min()) >= 1e-3


@pytest.mark.parametrize("cache_logits", [False, True])
def test_training_learns_the_coupling(cache_logits):
    layer = CoDDLayer(pc.compile(pc.structures.hmm(2, 4, VOCAB, seed=0)), mask_id=MASK, gate=float("inf"))
    data = pair_data(256, 0)
    x_t = torch.full((1, 2), MASK)
    before = layer.log_prob(torch.tensor([[1, 1]]), torch.zeros(1, 2, VOCAB), x_t).item()
    history = train_codd(layer, uniform_backbone, data, epochs=20, batch_size=64, lr=0.2, cache_logits=cache_logits,
                         top_k=3 if cache_logits else None, progress=False)
    assert len(history["step_loss"]) == 20 * 4 and len(history["epoch_loss"]) == 20
    assert history["epoch_loss"][-1] < history["epoch_loss"][0] - 0.3
    after = torch.stack([layer.log_prob(torch.tensor([[a, b]]), torch.zeros(1, 2, VOCAB), x_t)[0].exp()
                         for a in range(VOCAB) for b in range(VOCAB)]).detach().view(VOCAB, VOCAB)
    assert after.diagonal().sum().item() > 0.6  # p(a, a) mass, 0.25 before training (4 states can merge tokens: local optimum)
    assert after[1, 1].log().item() > before


def test_windowed_loss_sums_windows_over_positions():
    layer = CoDDLayer(pc.compile(pc.structures.hmm(2, 2, VOCAB, seed=1), dtype=torch.float64), mask_id=MASK)
    x_0 = torch.tensor([[0, 1, 2, 3, 0]])
    x_t = torch.tensor([[MASK, 1, MASK, MASK, MASK]])
    logits = torch.randn(1, 5, VOCAB, dtype=torch.float64)
    w = torch.tensor([2.0], dtype=torch.float64)
    expected = -(layer.log_prob(x_0[:, :2], logits[:, :2], x_t[:, :2]) + layer.log_prob(x_0[:, 2:4], logits[:, 2:4], x_t[:, 2:4])
                 + layer.log_prob(x_0[:, 4:], logits[:, 4:], x_t[:, 4:])) * 2 / 5
    assert windowed_loss(layer, x_0, logits, x_t, w).item() == pytest.approx(expected.item(), rel=1e-12)


def test_windowed_loss_stacks_the_full_windows_of_every_row_with_their_row_weights():
    """Two rows with different weights: the full windows of both rows go through one batch and
    each keeps its row's weight."""
    layer = CoDDLayer(pc.compile(pc.structures.hmm(2, 2, VOCAB, seed=1), dtype=torch.float64), mask_id=MASK)
    x_0 = torch.tensor([[0, 1, 2, 3, 0], [3, 2, 1, 0, 1]])
    x_t = torch.tensor([[MASK, 1, MASK, MASK, MASK], [3, MASK, MASK, 0, MASK]])
    logits = torch.randn(2, 5, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    expected = sum(-layer.log_prob(x_0[:, a:b], logits[:, a:b], x_t[:, a:b]) for a, b in ((0, 2), (2, 4), (4, 5)))
    assert windowed_loss(layer, x_0, logits, x_t, w).item() == pytest.approx(float((expected * w).sum() / 10), rel=1e-12)


def test_train_rejects_bad_data():
    layer = CoDDLayer(pc.compile(pc.structures.hmm(2, 2, VOCAB, seed=1)), mask_id=MASK)
    with pytest.raises(ValueError, match="data"):
        train_codd(layer, uniform_backbone, torch.full((2, 4), 7), progress=False)
    with pytest.raises(ValueError, match="prompt_mask"):
        train_codd(layer, uniform_backbone, pair_data(2, 0), prompt_mask=torch.zeros(2, 3, dtype=torch.bool), progress=False)


def test_save_and_load_pretrained(tmp_path):
    circuit = pc.compile(pc.structures.hmm(3, 2, VOCAB, seed=2))
    layer = CoDDLayer(circuit, mask_id=MASK, temperature=0.5, gate=0.7, mode="marginal", top_k=3)
    save_pretrained(layer, tmp_path / "codd")
    loaded = from_pretrained(tmp_path / "codd")
    assert (loaded.mask_id, loaded.temperature, loaded.gate, loaded.mode, loaded.top_k) == (MASK, 0.5, 0.7, "marginal", 3)
    logits = torch.randn(2, 3, VOCAB)
    x_t = torch.tensor([[MASK, 1, MASK], [0, MASK, 2]])
    assert torch.equal(loaded(logits, x_t), layer(logits, x_t))
    assert from_pretrained(tmp_path / "codd", mode="latent", gate=2.0).mode == "latent"
    save_pretrained(CoDDLayer(circuit, mask_id=MASK, normalize=True), tmp_path / "normalised")
    assert from_pretrained(tmp_path / "normalised").normalize is True
    config = json.loads((tmp_path / "codd" / "codd_config.json").read_text())
    config["vocab_size"] = 9
    (tmp_path / "codd" / "codd_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab_size"):
        from_pretrained(tmp_path / "codd")
    with pytest.raises(FileNotFoundError, match="codd_config"):
        from_pretrained(tmp_path / "nothing")
