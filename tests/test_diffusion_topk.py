"""CoDDLayer with top-k evidence: sparse all the way to the circuit, equal to the dense path
on truncated logits in every mode, including windows shorter than the circuit."""

from __future__ import annotations

import pytest
import torch

import pclayer as pc
from diffusion import CoDDLayer
from diffusion.evidence import SparseLogits

MASK = 99
VOCAB = 7


def _setup(width: int):
    circuit = pc.compile(pc.structures.hmm(4, 3, VOCAB, seed=3), dtype=torch.float64)
    logits = torch.randn(2, width, VOCAB, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_t = torch.tensor([[MASK, 2, MASK, 5], [MASK, MASK, MASK, 1]])[:, :width]
    top = logits.topk(3, -1)
    truncated = torch.full_like(logits, -torch.inf).scatter(-1, top.indices, top.values)
    return circuit, logits, x_t, top, truncated


@pytest.mark.parametrize("width", [4, 3])
@pytest.mark.parametrize("mode", ["latent", "marginal", "sample", "any_order"])
def test_top_k_and_sparse_logits_equal_the_dense_truncated_logits(mode, width):
    circuit, logits, x_t, top, truncated = _setup(width)
    top_k = CoDDLayer(circuit, mask_id=MASK, gate=2.0, mode=mode, top_k=3)
    full = CoDDLayer(circuit, mask_id=MASK, gate=2.0, mode=mode)
    assert isinstance(top_k.evidence(logits, x_t).soft, pc.TopKEvidence)
    assert isinstance(full.evidence(SparseLogits(top.values, top.indices), x_t).soft, pc.TopKEvidence)
    expected = full(truncated, x_t, torch.Generator().manual_seed(1))
    for layer, given in ((top_k, logits), (full, SparseLogits(top.values, top.indices))):
        out = layer(given, x_t, torch.Generator().manual_seed(1))
        masked = (x_t == MASK).unsqueeze(-1).expand_as(out)
        torch.testing.assert_close(out[masked], expected[masked], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out[~masked], truncated[~masked] if given is not logits else logits[~masked])


@pytest.mark.parametrize("width", [4, 3])
def test_log_prob_and_its_gradients_with_sparse_logits(width):
    circuit, _, x_t, top, truncated = _setup(width)
    layer = CoDDLayer(circuit, mask_id=MASK, temperature=0.7)
    x_0 = torch.where(x_t == MASK, top.indices[..., 1], x_t)
    values = top.values.clone().requires_grad_(True)
    dense = truncated.clone().requires_grad_(True)
    sparse_lp = layer.log_prob(x_0, SparseLogits(values, top.indices), x_t)
    sparse_lp.sum().backward()
    grads = [p.grad.clone() for p in circuit.parameters()]
    circuit.zero_grad()
    dense_lp = layer.log_prob(x_0, dense, x_t)
    dense_lp.sum().backward()
    torch.testing.assert_close(sparse_lp, dense_lp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(values.grad, dense.grad.gather(-1, top.indices), rtol=1e-9, atol=1e-12)
    for grad, p in zip(grads, circuit.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=1e-9, atol=1e-12)


def test_bad_sparse_logits_are_rejected():
    circuit, _, x_t, top, _ = _setup(4)
    layer = CoDDLayer(circuit, mask_id=MASK)
    with pytest.raises(ValueError, match="logits.indices: expected token ids in"):
        layer(SparseLogits(top.values, top.indices + VOCAB), x_t)
    with pytest.raises(ValueError, match="lists the same token twice"):
        layer(SparseLogits(top.values, top.indices[..., :1].expand(-1, -1, 3).contiguous()), x_t)
    with pytest.raises(ValueError, match="logits.indices: expected an int64 tensor"):
        layer(SparseLogits(top.values, top.indices.int()), x_t)
    with pytest.raises(ValueError, match="logits.values: NaN"):
        layer(SparseLogits(torch.full_like(top.values, float("nan")), top.indices), x_t)


def test_windowed_loss_with_sparse_logits_equals_the_dense_truncated_loss():
    from diffusion.train import windowed_loss

    circuit = pc.compile(pc.structures.hmm(2, 2, VOCAB, seed=4), dtype=torch.float64)
    layer = CoDDLayer(circuit, mask_id=MASK)
    x_0 = torch.tensor([[0, 1, 2, 3, 4], [6, 5, 4, 3, 2]])
    x_t = torch.tensor([[MASK, 1, MASK, MASK, 4], [MASK, MASK, 4, MASK, MASK]])
    logits = torch.randn(2, 5, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    indices = logits.scatter(-1, x_0.unsqueeze(-1), torch.inf).topk(3, -1).indices  # the clean token is kept
    values = logits.gather(-1, indices)
    dense = torch.full_like(logits, -torch.inf).scatter(-1, indices, values)
    weight = torch.tensor([1.5, 2.0], dtype=torch.float64)
    sparse_loss = windowed_loss(layer, x_0, SparseLogits(values, indices), x_t, weight)
    assert torch.isfinite(sparse_loss)
    torch.testing.assert_close(sparse_loss, windowed_loss(layer, x_0, dense, x_t, weight), rtol=1e-12, atol=1e-12)
