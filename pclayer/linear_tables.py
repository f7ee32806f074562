"""Normalised parameter tables for one evaluation, in log space and in linear space.

The scaled linear-space program (:mod:`pclayer.scaled`) multiplies by probabilities, not
log-probabilities. When no gradient can reach the parameters it reads them from a per-circuit
:class:`LinearTableCache`: ``softmax`` of the raw parameters, computed once per parameter
version straight into buffers that are reused across versions (a fresh multi-megabyte tensor
costs page faults on every first touch), without the log-space tables, which are computed only
if some layer needs them. Under autograd the linear tables are ``exp`` of the caller's
differentiable log-tables, so gradients flow as in the log-space program.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch


class LinearTableCache:
    """Per-circuit cache of linear tables, keyed on the raw tensors' versions.

    Entries are recomputed when the raw parameter (or the mask of a sparse sum) changes:
    version counter, storage, dtype, device, shape, or grad/inference mode of the call.
    A recomputation writes into the previous entry's buffer when shape, dtype and device
    agree. Evaluations running on other threads while parameters change read whatever the
    buffer holds, exactly as they would read parameters changed under them.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[str, bool], tuple[tuple, torch.Tensor, float]] = {}
        self.scratch: torch.Tensor | None = None  # natural-layout softmax before a transposed copy
        self.bank_views: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self.lock = threading.Lock()

    def bank_weights(self, key: str, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per bank of the linear sum table ``table`` (banks, N, C) of ``key`` its (C, N)
        transposed view; built once per buffer (recomputations write into the same buffer)."""
        entry = self.bank_views.get(key)
        if entry is None or entry[0] is not table:
            entry = (table, tuple(bank.t() for bank in table.unbind(0)))
            self.bank_views[key] = entry
        return entry[1]

    def get(self, circuit, key: str, transposed: bool) -> tuple[torch.Tensor, float]:
        """``softmax`` of parameter ``key`` over its last axis (``exp`` of a fixed log-table),
        and its smallest entry. ``transposed``: a 3-d table (banks, R, C) is stored as the
        contiguous (banks, C, R), so that one (bank, category) of a categorical table is one
        contiguous row."""
        raw, mask = _raw_tensors(circuit, key)
        stamp = _stamp(raw, mask)
        entry = self.entries.get((key, transposed))
        if entry is not None and entry[0] == stamp:
            return entry[1], entry[2]
        with self.lock:
            entry = self.entries.get((key, transposed))
            if entry is None or entry[0] != stamp:
                buffer = entry[1] if entry is not None else None
                table = self._normalise_into(raw, mask, key, transposed, buffer)
                entry = (stamp, table, float(table.amin()) if table.numel() else 1.0)
                self.entries[(key, transposed)] = entry
        return entry[1], entry[2]

    def refresh(self, circuit, key: str, probabilities: torch.Tensor) -> None:
        """After an in-place update of parameter ``key`` that computed its new normalised table
        ``probabilities`` (same shape, natural layout; e.g. the M-step), write it into the
        entries of ``key`` that exist, so their next use needs no softmax."""
        raw, mask = _raw_tensors(circuit, key)
        stamp = _stamp(raw, mask)
        with self.lock:
            for transposed in (False, True):
                entry = self.entries.get((key, transposed))
                if entry is None:
                    continue
                buffer = entry[1]
                source = probabilities.transpose(1, 2) if transposed else probabilities
                if buffer.shape != source.shape or buffer.dtype != source.dtype or buffer.device != source.device:
                    del self.entries[(key, transposed)]
                    continue
                buffer.copy_(source)
                self.entries[(key, transposed)] = (stamp, buffer, float(buffer.amin()) if buffer.numel() else 1.0)

    def _normalise_into(self, raw: torch.Tensor, mask: torch.Tensor | None, key: str, transposed: bool,
                        buffer: torch.Tensor | None) -> torch.Tensor:
        """Write the linear table into ``buffer`` (or a new tensor when its shape, dtype or device
        differ) and return it. A transposed table is normalised in its natural layout (fused,
        vectorised softmax) into a scratch buffer reused across keys, then copied transposed."""
        shape = (raw.shape[0], raw.shape[2], raw.shape[1]) if transposed else tuple(raw.shape)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != raw.dtype or buffer.device != raw.device:
            buffer = raw.new_empty(shape)
        if key.startswith("ind_"):  # fixed log indicator tables
            torch.exp(raw.transpose(1, 2) if transposed else raw, out=buffer)
            return buffer
        logits = raw if mask is None else raw.masked_fill(~mask, -torch.inf)
        if not transposed:
            return torch.softmax(logits, dim=-1, out=buffer)
        scratch = self.scratch
        if scratch is None or scratch.numel() < raw.numel() or scratch.dtype != raw.dtype or scratch.device != raw.device:
            scratch = self.scratch = raw.new_empty(raw.numel())
        natural = torch.softmax(logits, dim=-1, out=scratch[:raw.numel()].view(raw.shape))
        return buffer.copy_(natural.transpose(1, 2))


def _stamp(raw: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """What identifies one version of a table: version counter, storage, dtype, device and
    shape of the raw tensors, and whether inference mode is on."""
    stamp = tuple((t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in (raw, mask) if t is not None)
    return stamp + (torch.is_inference_mode_enabled(),)


def refresh_linear_tables(circuit, key: str, probabilities: torch.Tensor) -> None:
    """Tell ``circuit``'s linear-table cache the new normalised table of parameter ``key``
    (see :meth:`LinearTableCache.refresh`); call right after writing the parameter."""
    _cache_of(circuit).refresh(circuit, key, probabilities)


def _raw_tensors(circuit, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stored tensor behind table ``key`` (a parameter or a fixed log-table) and, for a
    sparse sum, its mask of real children."""
    if key in circuit.params:
        raw = circuit.params[key]
        return raw.detach(), getattr(circuit, f"fixed_{key}_mask") if key.startswith("sparse_") else None
    return getattr(circuit, f"fixed_{key}"), None


class TableSource:
    """The normalised tables of one evaluation.

    ``log`` is the mapping of :meth:`TensorCircuit.log_tables` (plus unbound per-bank views
    under autograd), computed on first use; :meth:`linear` gives probabilities. Built either
    from explicit (possibly differentiable) log-tables, or, with ``tables=None``, from the
    circuit's caches (valid only when no gradient can reach the parameters)."""

    def __init__(self, circuit, tables: Mapping | None):
        self.circuit = circuit
        self.cached = tables is None
        self._log = None if tables is None else tables
        self._memo: dict[tuple[str, bool], tuple[torch.Tensor, float]] = {}

    @property
    def log(self) -> Mapping:
        if self._log is None:
            with torch.no_grad():  # cached tables are constants
                self._log = self.circuit.log_tables()
        return self._log

    def raw_numel(self, key: str) -> int:
        """Number of entries of table ``key``."""
        return _raw_tensors(self.circuit, key)[0].numel()

    def linear(self, key: str, transposed: bool = False) -> tuple[torch.Tensor, float]:
        """Probabilities of table ``key`` (see :meth:`LinearTableCache.get` for ``transposed``)
        and their smallest entry (a float; measured only where no gradient flows)."""
        found = self._memo.get((key, transposed))
        if found is not None:
            return found
        if self.cached:
            found = _cache_of(self.circuit).get(self.circuit, key, transposed)
        else:
            table = self.log[key]
            linear = torch.exp(table.transpose(1, 2)).contiguous() if transposed else torch.exp(table)
            found = (linear, float(linear.detach().amin()) if linear.numel() else 1.0)
        self._memo[(key, transposed)] = found
        return found

    def bank_weights(self, key: str, bank: int) -> torch.Tensor:
        """(C, N) probabilities of bank ``bank`` of the sum table ``key`` (banks, N, C), a
        transposed view for ``x @ w`` (from the caches only)."""
        return _cache_of(self.circuit).bank_weights(key, self.linear(key)[0])[bank]


def _cache_of(circuit) -> LinearTableCache:
    cache = circuit.__dict__.get("_linear_tables")
    if cache is None:
        cache = circuit.__dict__.setdefault("_linear_tables", LinearTableCache())
    return cache
