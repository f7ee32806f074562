"""A small masked-diffusion transformer (MDLM-style) and its time-budgeted training on CPU.

The model is a bidirectional transformer encoder without time conditioning (as in MDLM and LLaDA): it maps a
partially masked sequence to logits over the ``vocab_size`` real tokens at every position; the mask token
(``mask_id = vocab_size``) is an input only. Training minimises the MDLM objective for the linear schedule:
draw ``t ~ U(0, 1)`` per sequence, mask each position with probability ``t``, and take the cross-entropy at the
masked positions weighted by ``1 / t`` (averaged over all positions). Half of the sequences keep their prefix
(the context before the window) clean, as when the model continues a prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of the backbone. ``seq_len = prefix + window`` positions; ``vocab_size`` predicted tokens."""

    vocab_size: int
    seq_len: int
    dim: int = 128
    depth: int = 3
    heads: int = 4

    @property
    def mask_id(self) -> int:
        return self.vocab_size


class MaskedDiffusionTransformer(nn.Module):
    """Bidirectional transformer denoiser ``x_t -> logits of x_0``.

    ``forward(x_t)``: x_t (B, L) int64 with values in ``[0, vocab_size]`` (``vocab_size`` = mask), ``L <= seq_len``;
    returns (B, L, vocab_size) float32 logits.
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.mask_id = config.mask_id
        self.embed = nn.Embedding(config.vocab_size + 1, config.dim)
        self.position = nn.Parameter(torch.randn(config.seq_len, config.dim))  # same scale as the token embeddings
        # A local convolution before attention hands every position its neighbours from the first step, so a
        # model trained for a few hundred steps already uses context (attention alone first plateaus at unigram).
        self.local = nn.Conv1d(config.dim, config.dim, kernel_size=5, padding=2)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size)

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        if x_t.ndim != 2 or x_t.shape[1] > self.config.seq_len:
            raise ValueError(f"x_t: expected shape (B, L) with L <= {self.config.seq_len}, got {tuple(x_t.shape)}")
        h = self.embed(x_t) + self.position[: x_t.shape[1]]
        h = h + self.local(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(self.encoder(h)))


def random_crops(tokens: torch.Tensor, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, length) random contiguous crops of a 1-D token tensor."""
    starts = torch.randint(0, tokens.numel() - length + 1, (count,), generator=generator)
    return tokens[starts[:, None] + torch.arange(length)]


def mdlm_mask(x_0: torch.Tensor, mask_id: int, prefix: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM forward noising of a batch (B, L): returns ``(x_t, t)`` with ``t`` (B,) in (0, 1].

    Rows draw stratified ``t`` (low-discrepancy, as in MDLM); every other row keeps its first ``prefix``
    positions clean.
    """
    batch, length = x_0.shape
    t = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    t = t[torch.randperm(batch, generator=generator)].clamp_min(1e-3)
    masked = torch.rand(batch, length, generator=generator) < t[:, None]
    masked[::2, :prefix] = False
    return torch.where(masked, torch.full_like(x_0, mask_id), x_0), t


def mdlm_loss(model: MaskedDiffusionTransformer, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MDLM loss: sum over masked positions of ``CE / t``, divided by the number of positions."""
    logits = model(x_t)
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), x_0, reduction="none")
    masked = x_t == model.mask_id
    return (ce * masked / t[:, None]).sum() / x_0.numel()


@torch.no_grad()
def masked_nll(model: MaskedDiffusionTransformer, tokens: torch.Tensor, *, batch_size: int, batches: int,
               seed: int) -> float:
    """Mean cross-entropy (nats) per masked token of ``model`` on random crops of ``tokens`` under MDLM noising."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(batches):
        x_0 = random_crops(tokens, model.config.seq_len, batch_size, generator)
        x_t, _ = mdlm_mask(x_0, model.mask_id, 0, generator)
        ce = nn.functional.cross_entropy(model(x_t).transpose(1, 2), x_0, reduction="none")
        masked = x_t == model.mask_id
        total += float((ce * masked).sum())
        count += int(masked.sum())
    return total / max(count, 1)


def train_backbone(model: MaskedDiffusionTransformer, train_tokens: torch.Tensor, *, seconds: float,
                   prefix: int, batch_size: int = 32, lr: float = 3e-3, warmup: int = 50, seed: int = 0,
                   max_steps: int | None = None) -> list[dict]:
    """Train ``model`` in place on random crops of ``train_tokens`` for ``seconds`` of wall time.

    The learning rate warms up linearly for ``warmup`` steps and then follows a cosine decay over the *time*
    budget, so any budget ends at a small learning rate. ``max_steps`` optionally caps the steps too.

    Returns:
        History: one dict per logged step with ``step``, ``seconds`` and ``loss`` (running mean).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    history: list[dict] = []
    running, step = None, 0
    bar = tqdm(total=round(seconds), desc="backbone (MDLM) training", unit="s", leave=False)
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or (max_steps is not None and step >= max_steps):
            break
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / seconds)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        x_0 = random_crops(train_tokens, model.config.seq_len, batch_size, generator)
        x_t, t = mdlm_mask(x_0, model.mask_id, prefix, generator)
        loss = mdlm_loss(model, x_0, x_t, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 25 == 0:
            history.append({"step": step, "seconds": round(time.perf_counter() - start, 2), "loss": running})
            bar.set_postfix(step=step, loss=f"{running:.3f}")
        bar.update(min(round(time.perf_counter() - start), bar.total) - bar.n)
    bar.close()
    model.eval()
    if not history or history[-1]["step"] != step:
        history.append({"step": step, "seconds": round(time.perf_counter() - start, 2), "loss": running})
    return history


def save_backbone(model: MaskedDiffusionTransformer, path: Path, metadata: dict) -> None:
    """Write config, weights and ``metadata`` to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict(), "metadata": metadata}, temporary)
    temporary.replace(path)


def load_backbone(path: Path, config: BackboneConfig, metadata: dict) -> MaskedDiffusionTransformer | None:
    """The saved model at ``path`` if it exists and was trained with this ``config`` and ``metadata``, else None."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable or foreign file is retrained and overwritten, never trusted
        return None
    if saved.get("config") != asdict(config) or saved.get("metadata") != metadata:
        return None
    model = MaskedDiffusionTransformer(config)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model
