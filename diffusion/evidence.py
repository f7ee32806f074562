"""Turn one window of backbone logits and partially masked tokens into circuit evidence.

A window has ``w <= W`` real positions (``W = circuit.num_vars``). Already unmasked
positions are hard evidence; masked positions carry the tempered backbone
log-probabilities ``log_softmax(logits / tau)`` as soft evidence; positions ``w..W-1``
(a window cut short at the end of a sequence) are summed out with no evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WindowEvidence:
    """Validated evidence of one window, padded to the circuit's width.

    Attributes:
        x: (B, W) long: token ids at unmasked positions, 0 at masked and padded ones.
        masked: (B, W) bool: masked real positions (False on padding).
        missing: (B, W) bool: ``masked`` or padding (summed out by the circuit).
        soft: (B, W, V) circuit-dtype log-weights: tempered backbone log-probabilities at
            masked positions (``-inf`` outside the top-k when ``top_k`` is set), 0 elsewhere.
        width: number of real positions ``w``.
    """

    x: torch.Tensor
    masked: torch.Tensor
    missing: torch.Tensor
    soft: torch.Tensor
    width: int


def check_circuit(circuit) -> int:
    """Return the vocabulary size ``V`` of a circuit whose variables are all ``V``-way categorical."""
    var_cats = circuit.var_cats
    if var_cats.numel() == 0 or bool((var_cats != var_cats[0]).any()) or int(var_cats[0]) < 1:
        raise ValueError(
            "circuit: expected every variable to be categorical over the same vocabulary, "
            f"got categories per variable {var_cats.tolist()[:10]}"
        )
    return int(var_cats[0])


def check_mask_id(mask_id: object) -> int:
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
        raise ValueError(f"mask_id: expected a non-negative int, got {mask_id!r}")
    return mask_id


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    return float(temperature)


def check_top_k(top_k: object, vocab: int) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k:
        raise ValueError(f"top_k: expected None or a positive int, got {top_k!r}")
    return min(top_k, vocab)


def check_tokens(name: str, tokens: object, shape: tuple[int, ...], vocab: int, mask_id: int | None) -> torch.Tensor:
    """Validate a (B, w) integer token tensor (values in [0, V), or ``mask_id`` if given)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {tokens.dtype}")
    if tuple(tokens.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(tokens.shape)}")
    valid = (tokens >= 0) & (tokens < vocab)
    if mask_id is not None:
        valid |= tokens == mask_id
    if not bool(valid.all()):
        b, i = (int(v) for v in (~valid).nonzero()[0])
        allowed = f"[0, {vocab})" + (f" or mask_id {mask_id}" if mask_id is not None else "")
        raise ValueError(f"{name}: value {int(tokens[b, i])} at row {b}, position {i} is not in {allowed}")
    return tokens.long()


def check_logits(logits: object, num_vars: int, vocab: int) -> torch.Tensor:
    """Validate backbone logits (B, w, V) with ``1 <= w <= num_vars``."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits: expected a float tensor of shape (B, w, {vocab}), got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.ndim != 3 or logits.shape[2] != vocab or not 1 <= logits.shape[1] <= num_vars or logits.shape[0] < 1:
        raise ValueError(
            f"logits: expected shape (B, w, V) with V = {vocab} (the circuit's vocabulary) and "
            f"1 <= w <= {num_vars} (the circuit's window), got {tuple(logits.shape)}"
        )
    if torch.isnan(logits).any():
        raise ValueError(f"logits: NaN at {tuple(int(i) for i in torch.isnan(logits).nonzero()[0])}")
    if (logits == torch.inf).any():
        raise ValueError("logits: +inf entries; expected finite logits (or -inf for excluded tokens)")
    return logits


def tempered_log_probs(logits: torch.Tensor, temperature: float, top_k: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``log_softmax(logits / tau)`` in ``dtype``; with ``top_k``, renormalised over each
    position's ``top_k`` largest logits and ``-inf`` elsewhere (ties broken by ``topk``)."""
    scaled = logits.to(dtype) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        values, index = scaled.topk(top_k, dim=-1)
        scaled = torch.full_like(scaled, -torch.inf).scatter(-1, index, values)
    out = torch.log_softmax(scaled, dim=-1)
    if torch.isnan(out).any():
        raise ValueError("logits: a position has every logit equal to -inf")
    return out


def window_evidence(circuit, logits: torch.Tensor, x_t: torch.Tensor, mask_id: int, temperature: float,
                    top_k: int | None) -> WindowEvidence:
    """Build the circuit evidence of a window.

    Args:
        circuit: a :class:`pclayer.TensorCircuit` over ``W`` positions with ``V`` categories.
        logits: (B, w, V) backbone logits, ``w <= W``.
        x_t: (B, w) tokens; ``mask_id`` marks masked positions.
        mask_id: the mask token id (may be ``>= V``, as in MDLM).
        temperature: tau applied to the backbone logits.
        top_k: keep only the top-k candidates per position (None = full vocabulary).
    """
    vocab = check_circuit(circuit)
    num_vars = circuit.num_vars
    check_logits(logits, num_vars, vocab)
    batch, width, _ = logits.shape
    x_t = check_tokens("x_t", x_t, (batch, width), vocab, mask_id)
    if x_t.device != circuit.device or logits.device != circuit.device:
        raise ValueError(f"logits, x_t: expected tensors on the circuit's device {circuit.device}, got {logits.device} and {x_t.device}")
    masked_real = x_t == mask_id
    pad = num_vars - width
    masked = torch.nn.functional.pad(masked_real, (0, pad), value=False)
    missing = torch.nn.functional.pad(masked_real, (0, pad), value=True)
    x = torch.nn.functional.pad(torch.where(masked_real, torch.zeros_like(x_t), x_t), (0, pad), value=0)
    soft = torch.zeros(batch, num_vars, vocab, dtype=circuit.dtype, device=circuit.device)
    if bool(masked_real.any()):
        logp = tempered_log_probs(logits, temperature, top_k, circuit.dtype)
        soft[:, :width] = torch.where(masked_real.unsqueeze(-1), logp, torch.zeros_like(logp))
    return WindowEvidence(x=x, masked=masked, missing=missing, soft=soft, width=width)
