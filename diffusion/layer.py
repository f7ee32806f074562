"""The CoDD output layer: a circuit over a window of positions times the backbone's
per-position distributions (a product of experts), as a drop-in logits transform.

For one window of ``W`` positions with masked set ``M`` and unmasked tokens ``x^U``,

    p_hat(x^M | x_t) = p_pc(x^M, x^U) * prod_{i in M} p_theta(x^i | x_t)^(1/tau) / Z,

where ``Z`` is one circuit pass with the tempered backbone log-probabilities as soft
evidence on the masked positions and the unmasked tokens as hard evidence.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

import pclayer
from diffusion.evidence import (
    SparseLogits, WindowEvidence, check_circuit, check_mask_id, check_temperature, check_tokens, check_top_k,
    window_evidence,
)

MODES = ("latent", "marginal", "sample", "any_order")


class CoDDLayer(nn.Module):
    """Coupled Discrete Diffusion output layer over a window of ``W = circuit.num_vars`` positions.

    Args:
        circuit: a :class:`pclayer.TensorCircuit` whose ``W`` variables are all categorical
            over the backbone vocabulary ``V`` (the paper: a homogeneous HMM, 1024 states).
            Its parameters are this module's parameters (trained by :func:`diffusion.codd_loss`).
        mask_id: the mask token id in ``x_t``; may be ``>= V`` (MDLM's GPT-2 setting puts it at
            ``V``). An in-vocabulary mask id (``mask_id < V``: LLaDA, Dream, MDLM's BERT
            setting) is never predicted: its logit is ``-inf`` at every masked position of the
            output and it has probability zero in the product.
        temperature: tau > 0; the backbone term is tempered, ``p_theta^(1/tau)``, before the
            product (the paper tempers only the backbone term). Also used by :meth:`log_prob`;
            train with 1.0.
        gate: gamma (the paper's adaptive activation); a row's window is coupled only when its
            mask ratio (masked positions / real window positions) is strictly below ``gate``.
            Each row is gated on its own (the published code averages the ratio over the
            batch). The first step of every block sees a fully masked window (ratio 1), so
            any ``gate <= 1`` leaves that step plain; with one step per block a
            ``gate <= 1`` never couples at all. ``gate > 1`` (e.g. ``float("inf")``) couples
            every step. :func:`diffusion.generate` warns when the gate disabled the layer on
            every step.
        mode: what the call returns at masked positions:
            ``"latent"`` (the paper): draw the latent path (one input node per position) from
            its posterior under the product and return
            ``log_softmax(logits / tau) + log theta_{chosen node}``;
            ``"marginal"``: the exact log posterior marginals ``log p_hat(x^i | x_t)``
            (deterministic);
            ``"sample"``: one exact joint sample of ``p_hat`` as one-hot logits (0 at the drawn
            token, ``-inf`` elsewhere);
            ``"any_order"`` (the paper's CoDD+AO): positions are fixed one at a time, the most
            confident first, each to the argmax of its exact conditional given the
            positions fixed before it; a position's logits are its log-conditional at the
            moment it was fixed, so a greedy host sampler reproduces the fixed tokens and its
            confidence is the conditional probability. Costs one posterior pass per masked
            position.
        top_k: keep only each masked position's ``top_k`` largest backbone logits as evidence
            (the backbone distribution is truncated and renormalised; tokens outside the top-k
            get ``-inf`` logits), passed to the circuit as :class:`pclayer.TopKEvidence`
            (no dense (B, W, V) evidence; except that the ``"marginal"`` and ``"any_order"``
            posteriors of a window shorter than the circuit, whose summed-out padding needs a
            full row, take :func:`pclayer.posterior`'s dense route). ``None`` = full vocabulary (exact).
        normalize: return log-probabilities instead of logits: ``log_softmax`` over the
            vocabulary at every position (the ``"latent"`` mode's output is otherwise not
            normalised). Samplers that multiply ``p(x_0)`` by a rate (MDLM) need this.

    Returned logits may contain ``-inf`` (tokens of probability zero); unmasked positions and
    ungated rows are returned unchanged.
    """

    def __init__(self, circuit: pclayer.TensorCircuit, *, mask_id: int, temperature: float = 1.0,
                 gate: float = 1.0, mode: str = "latent", top_k: int | None = None, normalize: bool = False):
        super().__init__()
        if not isinstance(circuit, pclayer.TensorCircuit):
            raise TypeError(f"circuit: expected a pclayer.TensorCircuit (see pclayer.compile), got {type(circuit).__name__}")
        self.vocab_size = check_circuit(circuit)
        self.circuit = circuit
        self.mask_id = check_mask_id(mask_id)
        self.temperature = check_temperature(temperature)
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or gate != gate:
            raise ValueError(f"gate: expected a number (mask-ratio threshold), got {gate!r}")
        self.gate = float(gate)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.top_k = check_top_k(top_k, self.vocab_size)
        self.normalize = _check_bool("normalize", normalize)
        self._scratch = _Scratch()

    @property
    def window(self) -> int:
        """W, the number of positions the circuit covers."""
        return self.circuit.num_vars

    def extra_repr(self) -> str:
        return (f"window={self.window}, vocab_size={self.vocab_size}, mask_id={self.mask_id}, "
                f"temperature={self.temperature}, gate={self.gate}, mode={self.mode!r}, top_k={self.top_k}, "
                f"normalize={self.normalize}")

    def evidence(self, logits: torch.Tensor | SparseLogits, x_t: torch.Tensor) -> WindowEvidence:
        """The window's circuit evidence (see :func:`diffusion.evidence.window_evidence`)."""
        return window_evidence(self.circuit, logits, x_t, self.mask_id, self.temperature, self.top_k)

    def gated_rows(self, x_t: torch.Tensor, gate: float | None = None) -> torch.Tensor:
        """(B,) bool: rows with at least one masked position and mask ratio ``< gate``
        (``self.gate`` unless given)."""
        masked = x_t == self.mask_id
        ratio = masked.to(torch.float64).mean(dim=1)
        return masked.any(dim=1) & (ratio < (self.gate if gate is None else gate))

    def forward(self, logits: torch.Tensor | SparseLogits, x_t: torch.Tensor, generator: torch.Generator | None = None,
                gate: float | None = None, normalize: bool | None = None) -> torch.Tensor:
        """Apply the layer to a window.

        Args:
            logits: (B, w, V) backbone logits of the window's positions, ``w <= W``; a window
                shorter than the circuit (end of a sequence) sums out positions ``w..W-1``;
                or :class:`~diffusion.evidence.SparseLogits` (k candidates per position).
                ``B = 0`` gives an empty result.
            x_t: (B, w) current tokens, ``mask_id`` where masked.
            generator: torch generator for the random modes (``"latent"``, ``"sample"``).
            gate: overrides ``self.gate`` for this call.
            normalize: overrides ``self.normalize`` for this call.

        Returns:
            (B, w, V) logits in ``logits.dtype``: coupled at the masked positions of gated rows;
            the mask id's entry is ``-inf`` at every masked position when ``mask_id < V``;
            with ``normalize``, ``log_softmax`` of that over the vocabulary at every position.
        """
        normalize = self.normalize if normalize is None else _check_bool("normalize", normalize)
        buffer = None
        if self.top_k is None and isinstance(logits, torch.Tensor) and logits.dim() == 3 and not logits.requires_grad:
            buffer = self._scratch.get("evidence", (logits.shape[0], self.window, self.vocab_size), self.circuit)
        ev = window_evidence(self.circuit, logits, x_t, self.mask_id, self.temperature, self.top_k, buffer)
        rows = self.gated_rows(x_t, gate).nonzero().flatten()
        out = _dense_logits(logits, self.vocab_size)
        if self.mask_id < self.vocab_size:
            out[..., self.mask_id] = torch.where(ev.masked[:, : ev.width], -torch.inf, out[..., self.mask_id])
        if rows.numel():
            sub = ev.rows(rows)
            row, position = sub.masked[:, : ev.width].nonzero(as_tuple=True)
            target = rows[row] * ev.width + position
            with torch.no_grad():
                if self.mode == "latent" and not isinstance(sub.soft, pclayer.TopKEvidence):
                    self._write_latent(out, target, sub, row, position, generator)
                else:
                    _write_positions(out, target, self._window_logits(sub, generator), row, position)
        return torch.log_softmax(out, dim=-1) if normalize else out

    def _write_latent(self, out: torch.Tensor, target: torch.Tensor, ev: WindowEvidence, row: torch.Tensor,
                      position: torch.Tensor, generator: torch.Generator | None) -> None:
        """The ``"latent"`` mode under dense evidence, written straight into rows ``target``
        (A,) of ``out`` viewed as (B * w, V): for masked position ``(row[a], position[a])`` of
        ``ev``, the tempered backbone log-probabilities plus the chosen input node's
        log-probabilities (only those A rows are read, in reusable buffers)."""
        result = self.circuit.sample(x=ev.x, missing=ev.missing, soft_evidence=ev.soft, generator=generator,
                                     return_nodes=True)
        shape = (len(row), self.vocab_size)
        new = result.node_log_probs_of(row, position, out=self._scratch.get("node rows", shape, self.circuit))
        soft = ev.soft.view(-1, self.vocab_size)
        new.add_(torch.index_select(soft, 0, row * self.window + position,
                                    out=self._scratch.get("soft rows", shape, self.circuit)))
        out.view(-1, out.shape[-1]).index_copy_(0, target, new.to(out.dtype))

    def _window_logits(self, ev: WindowEvidence, generator: torch.Generator | None) -> torch.Tensor | SparseLogits:
        """(B, W, V) new logits for every position of the (gated) rows of ``ev`` (only the
        masked positions are meaningful), or, for the ``"latent"`` mode under top-k
        evidence, :class:`SparseLogits` (B, W, k): the logits on the candidates, ``-inf``
        elsewhere."""
        circuit = self.circuit
        if self.mode == "latent":  # top-k evidence (dense evidence: _write_latent)
            result = circuit.sample(x=ev.x, missing=ev.missing, soft_evidence=ev.soft, generator=generator, return_nodes=True)
            indices = ev.soft.indices
            return SparseLogits(ev.soft.values + result.node_log_probs_at(indices), indices)
        if self.mode == "marginal":
            return torch.log(circuit.posterior(ev.x, missing=ev.missing, soft_evidence=ev.soft))
        if self.mode == "sample":
            drawn = circuit.sample(x=ev.x, missing=ev.missing, soft_evidence=ev.soft, generator=generator)
            one_hot = torch.full((*drawn.shape, self.vocab_size), -torch.inf, dtype=circuit.dtype, device=drawn.device)
            return one_hot.scatter(-1, drawn.unsqueeze(-1), 0.0)
        return self._any_order(ev)

    def _any_order(self, ev: WindowEvidence) -> torch.Tensor:
        circuit = self.circuit
        x, missing, free = ev.x.clone(), ev.missing.clone(), ev.masked.clone()
        out = torch.zeros(*x.shape, self.vocab_size, dtype=circuit.dtype, device=x.device)
        rows = torch.arange(x.shape[0], device=x.device)
        while bool(free.any()):
            log_post = torch.log(circuit.posterior(x, missing=missing, soft_evidence=ev.soft))
            best_value, best_token = log_post.max(dim=-1)  # (B, W)
            confidence = torch.where(free, best_value, torch.full_like(best_value, -torch.inf))
            position = confidence.argmax(dim=1)
            active = free[rows, position]
            r, p = rows[active], position[active]
            out[r, p] = log_post[r, p]
            x[r, p] = best_token[r, p]
            missing[r, p] = False
            free[r, p] = False
        return out

    def log_prob(self, x_0: torch.Tensor, logits: torch.Tensor | SparseLogits, x_t: torch.Tensor) -> torch.Tensor:
        """Exact ``log p_hat(x_0^M | x_t)`` of the clean tokens at the masked positions.

        ``log p_hat = log F(x_0 at all positions) - log F(x_t's unmasked tokens, masked
        positions summed out)``, both circuit passes with the tempered backbone
        log-probabilities as soft evidence on the masked positions. Ignores the gate (an
        inference rule). Differentiable with respect to the circuit parameters and ``logits``.

        Args:
            x_0: (B, w) clean tokens in ``[0, V)``; must equal ``x_t`` at unmasked positions.
            logits: (B, w, V) backbone logits, or :class:`~diffusion.evidence.SparseLogits`
                (k candidates per position, e.g. cached top-k logits).
            x_t: (B, w) noisy tokens.

        Returns:
            (B,) log-probabilities (0 for rows with no masked position).
        """
        ev = self.evidence(logits, x_t)
        batch, width = x_t.shape
        x_0 = check_tokens("x_0", x_0, (batch, width), self.vocab_size, None)
        if self.mask_id < self.vocab_size and bool((x_0 == self.mask_id).any()):
            raise ValueError(f"x_0: contains the mask id {self.mask_id}; clean tokens never equal the mask")
        if batch == 0:
            return torch.zeros(0, dtype=self.circuit.dtype, device=x_0.device)
        unmasked = ~ev.masked[:, :width]
        disagree = unmasked & (x_0 != x_t)
        if bool(disagree.any()):
            b, i = (int(v) for v in disagree.nonzero()[0])
            raise ValueError(f"x_0: differs from x_t at unmasked position (row {b}, position {i}): {int(x_0[b, i])} vs {int(x_t[b, i])}")
        x_full = torch.nn.functional.pad(x_0, (0, self.window - width), value=0)
        padding = ev.missing & ~ev.masked
        # numerator and denominator rows in one circuit pass (the tables are normalised once)
        both = self.circuit.log_prob(torch.cat([x_full, ev.x]), missing=torch.cat([padding, ev.missing]),
                                     soft_evidence=_twice(ev.soft))
        numerator, denominator = both[:batch], both[batch:]
        if bool(torch.isinf(denominator).any()):
            rows = torch.isinf(denominator).nonzero().flatten().tolist()
            raise pclayer.ZeroProbabilityError(f"x_t: the unmasked tokens of rows {rows[:10]} have probability zero under the circuit")
        return numerator - denominator


class _Scratch:
    """Per-thread buffers reused by a layer's calls (memory touched before costs no page
    faults; on this scale a fresh (W, V) tensor costs more than the arithmetic on it).
    Never pickled or copied: rebuilt on use."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def get(self, name: str, shape: tuple[int, ...], circuit: pclayer.TensorCircuit) -> torch.Tensor:
        """An uninitialised buffer ``name`` of ``shape`` in the circuit's dtype and device."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        found = buffers.get(name)
        if found is None or found.shape != shape or found.dtype != circuit.dtype or found.device != circuit.device \
                or (found.is_inference() and not torch.is_inference_mode_enabled()):  # (not writable out of inference mode)
            found = buffers[name] = torch.empty(shape, dtype=circuit.dtype, device=circuit.device)
        return found


def _twice(soft: torch.Tensor | pclayer.TopKEvidence) -> torch.Tensor | pclayer.TopKEvidence:
    """The evidence of a batch stacked on itself (rows ``b`` and ``B + b`` alike)."""
    if isinstance(soft, pclayer.TopKEvidence):
        free = None if soft.free is None else torch.cat([soft.free, soft.free])
        return pclayer.TopKEvidence(torch.cat([soft.values, soft.values]), torch.cat([soft.indices, soft.indices]), free)
    return torch.cat([soft, soft])


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def _dense_logits(logits: torch.Tensor | SparseLogits, vocab: int) -> torch.Tensor:
    """A contiguous (B, w, V) copy of the logits (``-inf`` outside the candidates of sparse logits)."""
    if isinstance(logits, SparseLogits):
        values, indices = logits
        return torch.full((*values.shape[:2], vocab), -torch.inf, dtype=values.dtype, device=values.device).scatter(-1, indices, values)
    return logits.clone(memory_format=torch.contiguous_format)


def _write_positions(out: torch.Tensor, target: torch.Tensor, new: torch.Tensor | SparseLogits,
                     row: torch.Tensor, position: torch.Tensor) -> None:
    """Write position ``(row[a], position[a])`` of ``new`` ((R, W, V), or sparse (R, W, k)
    with ``-inf`` off the candidates) into row ``target[a]`` of ``out`` viewed as (B * w, V)."""
    flat = out.view(-1, out.shape[-1])
    if isinstance(new, SparseLogits):
        values, indices = new
        flat.index_fill_(0, target, -torch.inf)
        entries = (target * flat.shape[1]).unsqueeze(1) + indices[row, position]
        flat.view(-1).index_put_((entries.reshape(-1),), values[row, position].reshape(-1).to(out.dtype))
    else:
        flat.index_copy_(0, target, new[row, position].to(out.dtype))
