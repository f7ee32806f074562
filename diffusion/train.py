"""Training the CoDD layer's circuit with the backbone frozen (paper §4.3, §6.2).

The paper's code does not publish training; every choice made here is listed in
:func:`train_codd`'s docstring.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from diffusion.evidence import SparseLogits
from diffusion.layer import CoDDLayer
from diffusion.loss import codd_loss


def noise(x_0: torch.Tensor, maskable: torch.Tensor, mask_id: int, eps: float,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's forward process: per row ``t ~ U(0, 1)``, ``p = (1 - eps) t + eps``; each
    maskable token is masked with probability ``p``. Returns ``(x_t (B, L), p (B,))``."""
    t = torch.rand(x_0.shape[0], generator=generator, dtype=torch.float64)
    p = (1 - eps) * t + eps
    hit = torch.rand(x_0.shape, generator=generator, dtype=torch.float64) < p[:, None]
    return torch.where(hit.to(x_0.device) & maskable, torch.full_like(x_0, mask_id), x_0), p


def windowed_loss(layer: CoDDLayer, x_0: torch.Tensor, logits: torch.Tensor | SparseLogits, x_t: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """:func:`codd_loss` over consecutive windows ``[0, W), [W, 2W), ...`` of sequences
    longer than the window (the last window may be shorter), normalised by the ``B * L``
    positions: the loss :func:`train_codd` minimises. The full windows of all rows are one
    batch of the circuit (the tables are normalised once for them), the shorter last
    window another.

    Args:
        layer: the :class:`CoDDLayer`.
        x_0: (B, L) clean tokens; x_t: (B, L) noisy tokens.
        logits: (B, L, V) backbone logits of ``x_t``, or :class:`SparseLogits` (B, L, k).
        weight: (B,) per-row weights (e.g. ``1 / t``).

    Returns:
        Scalar float64 loss, differentiable with respect to the circuit parameters.
    """
    batch, length = x_0.shape
    window = layer.window
    full = length // window * window
    total = torch.zeros((), dtype=torch.float64, device=x_0.device)
    if full:  # every full window of every row in one batch: one pass over the circuit's tables
        count = full // window

        def stacked(t: torch.Tensor) -> torch.Tensor:
            return t[:, :full].reshape(batch * count, window, *t.shape[2:])

        pieces = SparseLogits(stacked(logits.values), stacked(logits.indices)) if isinstance(logits, SparseLogits) \
            else stacked(logits)
        part = codd_loss(layer, stacked(x_0), pieces, stacked(x_t), weight.repeat_interleave(count))
        total = total + part.to(torch.float64) * (batch * full)
    if full < length:  # the shorter last window
        piece = logits.window(full, length) if isinstance(logits, SparseLogits) else logits[:, full:]
        part = codd_loss(layer, x_0[:, full:], piece, x_t[:, full:], weight)
        total = total + part.to(torch.float64) * (batch * (length - full))
    return total / (batch * length)


def _process_group(distributed: bool, data: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """``(rank, world size)``; checks that every rank holds the same ``data`` (collectives on
    ``device``, the circuit's: NCCL needs CUDA tensors)."""
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed: expected True or False, got {distributed!r}")
    if not distributed:
        return 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("distributed: torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (torchrun sets its environment)")
    weights = torch.arange(1, data.numel() + 1, dtype=torch.float64).remainder(1009.0) + 1
    fingerprint = torch.tensor([float(data.shape[0]), float(data.shape[1]), float((data.double().flatten() * weights).sum())],
                               dtype=torch.float64, device=device)
    low, high = fingerprint.clone(), fingerprint.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError("data: differs between ranks; with distributed=True every rank passes the same data "
                         "(each rank computes only its rows of each batch)")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _all_reduce_gradients(parameters: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of ``parameters`` and the loss over ranks (one all-reduce); returns
    the summed loss."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
    buffer = torch.cat([g.reshape(-1).to(torch.float64) for g in grads] + [loss.reshape(1).to(torch.float64)])
    torch.distributed.all_reduce(buffer)
    pieces = buffer.split([g.numel() for g in grads] + [1])
    for parameter, grad, piece in zip(parameters, grads, pieces):
        parameter.grad = piece.view_as(grad).to(grad.dtype)
    return pieces[-1][0]


def _truncate(logits: torch.Tensor, x_0: torch.Tensor, top_k: int | None) -> torch.Tensor | SparseLogits:
    """Keep each position's ``top_k`` logits, always including the clean token ``x_0``, as
    :class:`SparseLogits` (float32); the full logits when ``top_k`` is None or covers ``V``."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits.float()
    forced = logits.scatter(-1, x_0.unsqueeze(-1), torch.inf)
    indices = forced.topk(top_k, dim=-1).indices
    return SparseLogits(logits.gather(-1, indices).float(), indices)


def train_codd(layer: CoDDLayer, backbone: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, *,
               epochs: int = 1, batch_size: int = 8, lr: float = 1e-2, prompt_mask: torch.Tensor | None = None,
               cache_logits: bool = False, top_k: int | None = None, eps: float = 1e-3, seed: int = 0,
               distributed: bool = False, progress: bool = True) -> dict:
    """Fit the circuit of ``layer`` by Adam on the exact loss of Eq. 7, backbone frozen.

    Choices (the paper does not publish its training code):

    * Noise: per sequence ``t ~ U(0, 1)``, masking probability ``p = (1 - eps) t + eps``
      (LLaDA), each maskable token masked independently; with ``prompt_mask`` only response
      tokens (``prompt_mask == False``) are maskable.
    * Backbone: frozen: called under ``torch.no_grad`` on the noisy sequence ``x_t`` (it
      sees the whole sequence); its parameters are never optimised.
      ``cache_logits=True`` masks every sequence once (seeded) and reuses its logits for all
      epochs, as the paper precomputes logits; otherwise each batch is re-noised.
      ``top_k`` keeps only each position's ``top_k`` logits, always including the clean
      token (the rest ``-inf``: the backbone distribution is truncated for training, and
      the target must keep non-zero probability).
    * Windows: each sequence is cut into consecutive windows ``[0, W), [W, 2W), ...`` of
      the circuit's width (the last may be shorter and has its missing positions summed
      out); all windows share the circuit's global parameters.
    * Loss: :func:`codd_loss` with weight ``1 / p`` (MDLM/LLaDA ELBO weight), summed over
      windows and divided by the number of positions ``B * L`` (LLaDA's normalisation), i.e.
      about the NLL per masked token. The layer's temperature applies (use 1.0); the
      gate does not.
    * Optimiser: ``torch.optim.Adam(lr)`` on the circuit's unnormalised log-parameters.
      EM does not apply: the objective is a difference of two log partition functions
      (numerator with ``x_0``, denominator with masked positions summed out), so its
      gradient is a difference of flows that EM's closed-form update cannot take.
    * Order: batches in a seeded random permutation each epoch (fixed order with the cache).
    * Data parallel (``distributed=True``, on ``torch.distributed``: gloo on CPUs, NCCL on
      GPUs): every rank passes the same ``data``, ``seed`` and arguments and draws the same
      batches and noise; rank ``r`` of ``R`` runs the frozen backbone and the loss on rows
      ``r, r + R, ...`` of each batch only, the circuit's gradients are summed over ranks
      (one all-reduce per step) and every rank takes the same Adam step, so all ranks hold
      the same circuit, equal (up to rounding) to one process training on the whole data.
      A rank that passes different data raises ``ValueError`` on every rank.

    Args:
        layer: the :class:`CoDDLayer` whose ``circuit`` is trained in place.
        backbone: ``x (B, L) -> logits (B, L, V)`` (see :mod:`diffusion.adapters`).
        data: (N, L) clean token ids in ``[0, V)``.
        epochs, batch_size, lr: Adam schedule.
        prompt_mask: optional (N, L) bool, True at prompt tokens (never masked).
        cache_logits, top_k: see above.
        eps: smallest masking probability.
        seed: seeds noise and batch order.
        distributed: data-parallel training over the default process group (see above).
        progress: show a tqdm bar and print a summary (rank 0 only when distributed).

    Returns:
        History dict: ``step_loss`` (loss per step), ``epoch_loss`` (mean per epoch),
        ``seconds`` (wall time).
    """
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.is_floating_point() or data.dtype == torch.bool:
        raise ValueError(f"data: expected an (N, L) integer tensor of token ids, got {getattr(data, 'shape', type(data).__name__)}")
    if data.shape[0] == 0:
        raise ValueError("data: expected at least one row, got an empty (0, L) tensor")
    if bool(((data < 0) | (data >= layer.vocab_size)).any()):
        raise ValueError(f"data: token ids must lie in [0, {layer.vocab_size})")
    if bool((data == layer.mask_id).any()):
        rows = (data == layer.mask_id).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"data: rows {rows[:10]} contain the mask id {layer.mask_id}; clean training data must not "
                         "(remove or replace those tokens)")
    if prompt_mask is None:
        prompt_mask = torch.zeros_like(data, dtype=torch.bool)
    if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.dtype != torch.bool or prompt_mask.shape != data.shape:
        raise ValueError(f"prompt_mask: expected a bool tensor of shape {tuple(data.shape)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if not 0 < eps < 1:
        raise ValueError(f"eps: expected a number in (0, 1), got {eps!r}")
    rank, world = _process_group(distributed, data, layer.circuit.device)
    progress = progress and rank == 0
    generator = torch.Generator().manual_seed(seed)
    parameters = list(layer.circuit.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    num_rows, vocab = data.shape[0], layer.vocab_size
    data = data.long()

    def backbone_logits(x_t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = backbone(x_t)
        if not isinstance(logits, torch.Tensor) or logits.shape != (*x_t.shape, vocab):
            raise ValueError(f"backbone: expected logits of shape {(*x_t.shape, vocab)}, got {getattr(logits, 'shape', type(logits).__name__)}")
        return logits

    def local(rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch."""
        return rows[rank::world]

    cache = None
    if cache_logits:
        x_t_all, p_all = noise(data, ~prompt_mask, layer.mask_id, eps, generator)
        stored = []
        for start in tqdm(range(0, num_rows, batch_size), desc="backbone logits", disable=not progress):
            rows = local(torch.arange(start, min(start + batch_size, num_rows)))
            stored.append(_truncate(backbone_logits(x_t_all[rows]), data[rows], top_k) if rows.numel() else None)
        cache = (x_t_all, p_all, stored)

    history: dict = {"step_loss": [], "epoch_loss": [], "seconds": 0.0}
    began = time.perf_counter()
    total_steps = epochs * ((num_rows + batch_size - 1) // batch_size)
    bar = tqdm(total=total_steps, desc="train_codd", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(num_rows, generator=generator) if cache is None else torch.arange(num_rows)
        losses = []
        for batch_index, start in enumerate(range(0, num_rows, batch_size)):
            rows = order[start:start + batch_size]
            x_0 = data[rows]
            if cache is None:
                x_t, p = noise(x_0, ~prompt_mask[rows], layer.mask_id, eps, generator)
                mine = local(torch.arange(len(rows)))
                x_0, x_t, p = x_0[mine], x_t[mine], p[mine]
                logits = _truncate(backbone_logits(x_t), x_0, top_k) if len(mine) else None
            else:
                mine = local(rows)
                x_0, x_t, p = data[mine], cache[0][mine], cache[1][mine]
                logits = cache[2][batch_index]
            optimizer.zero_grad()
            if x_0.shape[0]:
                # This rank's share of the loss over the whole batch (positions of all ranks).
                loss = windowed_loss(layer, x_0, logits, x_t, (1.0 / p).to(torch.float32)) * (x_0.shape[0] / len(rows))
                loss.backward()
            else:
                loss = torch.zeros((), dtype=torch.float64, device=layer.circuit.device)
            if world > 1:
                loss = _all_reduce_gradients(parameters, loss.detach())
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history["step_loss"].extend(losses)
        history["epoch_loss"].append(sum(losses) / len(losses))
    bar.close()
    history["seconds"] = time.perf_counter() - began
    if progress:
        first, last = history["epoch_loss"][0], history["epoch_loss"][-1]
        print(f"train_codd: {epochs} epochs, {total_steps} steps in {history['seconds']:.1f}s; "
              f"loss per masked token {first:.4f} -> {last:.4f} nats")
    return history
