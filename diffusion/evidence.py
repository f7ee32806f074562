"""Turn one window of backbone logits and partially masked tokens into circuit evidence.

A window has ``w <= W`` real positions (``W = circuit.num_vars``). Already unmasked
positions are hard evidence; masked positions carry the tempered backbone
log-probabilities ``log_softmax(logits / tau)`` as soft evidence; positions ``w..W-1``
(a window cut short at the end of a sequence) are summed out with no evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

import pclayer


@dataclass
class WindowEvidence:
    """Validated evidence of one window, padded to the circuit's width.

    Attributes:
        x: (B, W) long: token ids at unmasked positions, 0 at masked and padded ones.
        masked: (B, W) bool: masked real positions (False on padding).
        missing: (B, W) bool: ``masked`` or padding (summed out by the circuit).
        soft: (B, W, V) circuit-dtype log-weights: tempered backbone log-probabilities at
            masked positions, 0 elsewhere; or, with top-k evidence, a
            :class:`pclayer.TopKEvidence` holding the tempered log-probabilities renormalised
            over each masked position's k candidates, ``free`` everywhere else.
        width: number of real positions ``w``.
    """

    x: torch.Tensor
    masked: torch.Tensor
    missing: torch.Tensor
    soft: torch.Tensor | pclayer.TopKEvidence
    width: int

    def rows(self, index: torch.Tensor) -> WindowEvidence:
        """The evidence of the rows ``index`` (1-d long); ``self`` when they are all rows in order."""
        if index.numel() == self.x.shape[0] and bool((index == torch.arange(len(index), device=index.device)).all()):
            return self
        soft = self.soft
        if isinstance(soft, pclayer.TopKEvidence):
            soft = pclayer.TopKEvidence(soft.values[index], soft.indices[index], soft.free[index])
        else:
            soft = soft[index]
        return WindowEvidence(self.x[index], self.masked[index], self.missing[index], soft, self.width)


class SparseLogits(NamedTuple):
    """Backbone logits kept on k candidate tokens per position (the rest ``-inf``), e.g.
    cached top-k logits; accepted wherever the CoDD layer takes dense (B, w, V) logits.

    Attributes:
        values: (B, w, k) float logits; indices: (B, w, k) int64 distinct token ids in [0, V).
    """

    values: torch.Tensor
    indices: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """(B, w, k)."""
        return tuple(self.values.shape)

    def window(self, start: int, stop: int) -> SparseLogits:
        """Positions ``start:stop``."""
        return SparseLogits(self.values[:, start:stop], self.indices[:, start:stop])


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


def check_logits(logits: object, num_vars: int, vocab: int) -> torch.Tensor | SparseLogits:
    """Validate backbone logits (B, w, V) (or :class:`SparseLogits`) with ``1 <= w <= num_vars``."""
    if isinstance(logits, SparseLogits):
        return check_sparse_logits(logits, num_vars, vocab)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits: expected a float tensor of shape (B, w, {vocab}), got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.ndim != 3 or logits.shape[2] != vocab or not 1 <= logits.shape[1] <= num_vars:
        raise ValueError(
            f"logits: expected shape (B, w, V) with V = {vocab} (the circuit's vocabulary) and "
            f"1 <= w <= {num_vars} (the circuit's window), got {tuple(logits.shape)}"
        )
    _check_no_nan_or_inf("logits", logits)
    return logits


def _check_no_nan_or_inf(name: str, values: torch.Tensor) -> None:
    """Raise for NaN or +inf entries of ``values`` (one reduction pass: the maximum is NaN or
    +inf exactly when such an entry exists)."""
    if not values.numel():
        return
    top = float(values.amax())
    if top != top:
        raise ValueError(f"{name}: NaN at {tuple(int(i) for i in torch.isnan(values).nonzero()[0])}")
    if top == float("inf"):
        raise ValueError(f"{name}: +inf entries; expected finite logits (or -inf for excluded tokens)")


def check_sparse_logits(logits: SparseLogits, num_vars: int, vocab: int) -> SparseLogits:
    """Validate :class:`SparseLogits`: (B, w, k) float values and int64 distinct indices in [0, V)."""
    values, indices = logits
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"logits.values: expected a float tensor of shape (B, w, k), got {getattr(values, 'dtype', type(values).__name__)}")
    if values.ndim != 3 or not 1 <= values.shape[1] <= num_vars or not 1 <= values.shape[2] <= vocab:
        raise ValueError(f"logits.values: expected shape (B, w, k) with 1 <= w <= {num_vars} and 1 <= k <= {vocab}, got {tuple(values.shape)}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.shape != values.shape:
        raise ValueError(f"logits.indices: expected an int64 tensor of shape {tuple(values.shape)}, "
                         f"got {getattr(indices, 'dtype', type(indices).__name__)} {tuple(getattr(indices, 'shape', ()))}")
    if bool(((indices < 0) | (indices >= vocab)).any()):
        raise ValueError(f"logits.indices: expected token ids in [0, {vocab})")
    ordered = indices.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("logits.indices: a position lists the same token twice; expected distinct candidates")
    _check_no_nan_or_inf("logits.values", values)
    return logits


def without_mask_token(logits: torch.Tensor | SparseLogits, mask_id: int, vocab: int) -> torch.Tensor | SparseLogits:
    """The logits with the mask token's entry at ``-inf`` when ``mask_id < V`` (an in-vocabulary
    mask, as in LLaDA and Dream): the mask id is never a prediction. Unchanged otherwise."""
    if mask_id >= vocab:
        return logits
    if isinstance(logits, SparseLogits):
        values = logits.values.masked_fill(logits.indices == mask_id, -torch.inf)
        return SparseLogits(values, logits.indices)
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)


def tempered_top_k(logits: torch.Tensor | SparseLogits, temperature: float, top_k: int | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probabilities (B, w, k), token ids (B, w, k))``: ``log_softmax(logits / tau)``
    renormalised over each position's ``k`` kept tokens (the ``top_k`` largest of dense
    logits, ties broken by ``topk``; the given candidates of sparse logits, cut to the
    ``top_k`` largest if ``top_k`` is smaller)."""
    if isinstance(logits, SparseLogits):
        values, indices = logits.values.to(dtype) / temperature, logits.indices
        if top_k is not None and top_k < values.shape[-1]:
            values, order = values.topk(top_k, dim=-1)
            indices = indices.gather(-1, order)
    else:  # dividing by tau > 0 keeps the order: only the kept logits are tempered
        values, indices = logits.topk(top_k, dim=-1)
        values = values.to(dtype) / temperature
    out = torch.log_softmax(values, dim=-1)
    if torch.isnan(out.amax(-1)).any():  # a row of -inf logits gives a row of NaN
        raise ValueError("logits: a position has every kept logit equal to -inf")
    return out, indices


def tempered_log_probs(logits: torch.Tensor, temperature: float, dtype: torch.dtype,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(logits / tau)`` in ``dtype`` over the full vocabulary (into ``out``, a
    buffer of ``logits``' shape and ``dtype``, when given: then not differentiable)."""
    if out is None:
        out = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    else:
        torch._log_softmax(out.copy_(logits).div_(temperature), -1, False, out=out)  # in place: elementwise per row
    if torch.isnan(out.amax(-1)).any():  # a row of -inf logits gives a row of NaN
        raise ValueError("logits: a position has every logit equal to -inf")
    return out


def window_evidence(circuit, logits: torch.Tensor | SparseLogits, x_t: torch.Tensor, mask_id: int,
                    temperature: float, top_k: int | None, out: torch.Tensor | None = None) -> WindowEvidence:
    """Build the circuit evidence of a window.

    Args:
        circuit: a :class:`pclayer.TensorCircuit` over ``W`` positions with ``V`` categories.
        logits: (B, w, V) backbone logits, ``w <= W``, or :class:`SparseLogits` (B, w, k).
        x_t: (B, w) tokens; ``mask_id`` marks masked positions.
        mask_id: the mask token id (may be ``>= V``, as in MDLM).
        temperature: tau applied to the backbone logits.
        top_k: keep only the top-k candidates per position (None = full vocabulary).
        out: a (B, W, V) buffer of the circuit's dtype for dense evidence of a full window
            without gradients (reused across calls); ignored otherwise.

    With ``top_k`` smaller than ``V`` or sparse logits the evidence is a
    :class:`pclayer.TopKEvidence` (no dense (B, W, V) evidence is built). An in-vocabulary
    mask id (``mask_id < V``) gets probability zero (see :func:`without_mask_token`).
    """
    vocab = check_circuit(circuit)
    num_vars = circuit.num_vars
    logits = without_mask_token(check_logits(logits, num_vars, vocab), mask_id, vocab)
    batch, width, _ = logits.shape
    x_t = check_tokens("x_t", x_t, (batch, width), vocab, mask_id)
    devices = {logits.values.device if isinstance(logits, SparseLogits) else logits.device, x_t.device}
    if devices != {circuit.device}:
        raise ValueError(f"logits, x_t: expected tensors on the circuit's device {circuit.device}, got {sorted(map(str, devices))}")
    masked_real = x_t == mask_id
    pad = num_vars - width
    masked = torch.nn.functional.pad(masked_real, (0, pad), value=False)
    missing = torch.nn.functional.pad(masked_real, (0, pad), value=True)
    x = torch.nn.functional.pad(torch.where(masked_real, torch.zeros_like(x_t), x_t), (0, pad), value=0)
    if isinstance(logits, SparseLogits) or (top_k is not None and top_k < vocab):
        return WindowEvidence(x, masked, missing, _topk_soft(circuit, logits, masked, temperature, top_k), width)
    if not bool(masked_real.any()):
        soft = torch.zeros(batch, num_vars, vocab, dtype=circuit.dtype, device=circuit.device)
    else:  # zero off the masked positions (in place when no gradient needs the log-softmax output)
        if out is not None and (width != num_vars or logits.requires_grad or out.shape != (batch, width, vocab)):
            out = None
        logp, unmasked = tempered_log_probs(logits, temperature, circuit.dtype, out), ~masked_real.unsqueeze(-1)
        soft = logp.masked_fill(unmasked, 0.0) if logp.requires_grad else logp.masked_fill_(unmasked, 0.0)
        if num_vars > width:
            soft = torch.nn.functional.pad(soft, (0, 0, 0, num_vars - width))
    return WindowEvidence(x=x, masked=masked, missing=missing, soft=soft, width=width)


def _topk_soft(circuit, logits: torch.Tensor | SparseLogits, masked: torch.Tensor, temperature: float,
               top_k: int | None) -> pclayer.TopKEvidence:
    """Top-k evidence of the masked positions ``masked`` (B, W); every other position is free
    (its candidates are placeholders: the tokens ``0..k-1`` with weight 0, chosen only at
    masked positions)."""
    batch, width, _ = logits.shape
    real = masked[:, :width]
    if isinstance(logits, SparseLogits) or bool(real.all()):
        values, indices = tempered_top_k(logits, temperature, top_k, circuit.dtype)
    else:  # only masked positions carry evidence: select the top-k of those rows alone
        rows = real.reshape(-1).nonzero().squeeze(1)
        picked, chosen = tempered_top_k(logits.reshape(batch * width, 1, -1).index_select(0, rows),
                                        temperature, top_k, circuit.dtype)
        k = picked.shape[-1]
        values = picked.new_zeros(batch * width, k).index_copy_(0, rows, picked.squeeze(1)).view(batch, width, k)
        indices = torch.arange(k, device=chosen.device).repeat(batch * width, 1)
        indices = indices.index_copy_(0, rows, chosen.squeeze(1)).view(batch, width, k)
    k = values.shape[-1]
    pad = circuit.num_vars - width
    if pad:
        filler = torch.arange(k, device=indices.device).expand(batch, pad, k)
        indices = torch.cat([indices, filler], dim=1)
        values = torch.cat([values, values.new_zeros(batch, pad, k)], dim=1)
    # Unmasked positions may carry -inf values (NaN-free since log_softmax saw a finite entry
    # or raised); they are free, so their values are ignored.
    return pclayer.TopKEvidence(values, indices, ~masked)
