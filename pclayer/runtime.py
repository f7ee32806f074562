"""The one owner of a compiled circuit's runtime state.

A :class:`Runtime` holds every cache of one :class:`~pclayer.TensorCircuit`: the normalised
log-tables, their linear (probability) copies, per-thread workspaces of reusable layer
buffers, and the backend that ran the last dispatched operation. One invalidation rule
serves all caches: an entry is valid while the *stamp* of the raw tensors it was computed
from is unchanged (version counter, storage, dtype, device, shape, inference mode), so
optimizer steps, EM, ``load_state_dict`` and ``.to()`` all invalidate it. The M-step hands
its new probabilities over with :meth:`Runtime.parameters_updated` (through
:meth:`TensorCircuit.parameters_updated`) so the next forward needs no softmax.

Workspaces are per thread (``threading.local``) and are freed with the runtime, i.e. with the
circuit. Caches are never pickled or deep-copied: they are rebuilt on use.
"""

from __future__ import annotations

import math
import threading

import torch


def stamp(*tensors: torch.Tensor | None) -> tuple:
    """What identifies one version of some tensors (see the module docstring)."""
    return tuple((t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors if t is not None) \
        + (torch.is_inference_mode_enabled(),)


class Workspace:
    """Preallocated layer buffers reused across no-grad calls with the same batch size, dtype,
    device and thread, so a call writes (``out=``) into memory it has touched before instead
    of paying page faults on fresh allocations. Layers share buffers by the plan's
    ``buffer_slots`` (see :func:`pclayer.passes.buffer_liveness`). Disabled (every request
    returns None, i.e. ops allocate as usual) under autograd, for plain plans, and when the
    caller keeps every layer's output (sampling)."""

    __slots__ = ("buffers", "slots")

    def __init__(self, buffers: dict | None, slots: list[int] | None):
        self.buffers, self.slots = buffers, slots

    @property
    def enabled(self) -> bool:
        return self.buffers is not None

    def scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised buffer for temporaries within one layer (shared by every layer that
        asks for ``name``), or None when disabled."""
        if self.buffers is None:
            return None
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device \
                or _frozen(buffer):
            buffer = like.new_empty(numel)
            self.buffers[name] = buffer
        return buffer[:numel].view(shape)

    def take(self, layer: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised buffer for the output of ``layer`` (valid until the last layer that
        reads it has run), or None when disabled."""
        if self.buffers is None or self.slots is None:
            return None
        view = self.buffers.get((layer, shape))  # the view handed out last time
        if view is not None and view.dtype == like.dtype and not _frozen(view):
            return view
        slot = self.slots[layer]
        numel = math.prod(shape)
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or _frozen(buffer):
            buffer = like.new_empty(numel)
            self.buffers[slot] = buffer
            for key in [key for key in self.buffers if isinstance(key, tuple) and self.slots[key[0]] == slot]:
                del self.buffers[key]  # views of the replaced buffer
        view = buffer[:numel].view(shape)
        self.buffers[(layer, shape)] = view
        return view


DISABLED = Workspace(None, None)


def _frozen(buffer: torch.Tensor) -> bool:
    """Whether ``buffer`` cannot be written here: made in inference mode, used outside it."""
    return buffer.is_inference() and not torch.is_inference_mode_enabled()


class Runtime:
    """Caches, workspaces and the dispatch record of one compiled circuit.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"cuda"``: where dispatched operations run
            (see :mod:`pclayer.ops.dispatch`).
    """

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend
        self.last_backend: str | None = None
        self.lock = threading.Lock()
        self.log_entries: dict[str, list] = {}  # [version, table, handed out]
        self.linear_entries: dict[tuple[str, bool], list] = {}  # [version, table, smallest entry or None]
        self.requests: dict[tuple, tuple] = {}
        self.scratch: torch.Tensor | None = None
        self.bank_views: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self.local = threading.local()

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy`` keep the backend only: caches are rebuilt on use."""
        return {"backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["backend"])

    def clear(self) -> None:
        """Drop every cached table and workspace (rebuilt on use)."""
        with self.lock:
            self.log_entries.clear()
            self.linear_entries.clear()
            self.requests.clear()
            self.bank_views.clear()
            self.scratch = None
        self.local = threading.local()

    def workspace(self, key: tuple, slots: list[int] | None) -> Workspace:
        """This thread's workspace for calls identified by ``key`` (batch, dtype, device, mode);
        only the latest key is kept per thread."""
        entry = getattr(self.local, "entry", None)
        if entry is None or entry[0] != key:
            entry = (key, {})
            self.local.entry = entry
        return Workspace(entry[1], slots)

    def scratch_workspace(self) -> Workspace:
        """This thread's scratch buffers for temporaries outside the layers (the top-down
        pass's draw rows), kept apart from the layer workspaces so that calls of other batch
        sizes do not evict those."""
        buffers = getattr(self.local, "scratch", None)
        if buffers is None:
            buffers = self.local.scratch = {}
        return Workspace(buffers, None)

    def cached_log(self, key: str, version: tuple, compute, shared: bool) -> torch.Tensor:
        """The normalised log-table of bank ``key`` for raw-tensor stamp ``version``:
        ``compute(buffer)`` writes it when stale, into the previous entry's buffer unless that
        was handed out (``shared``, see :meth:`pclayer.tables.CachedLogTables.table`)."""
        entry = self.log_entries.get(key)
        if entry is None or entry[0] != version:
            with self.lock:
                entry = self.log_entries.get(key)
                if entry is None or entry[0] != version:
                    buffer = entry[1] if entry is not None and not entry[2] else None
                    with torch.no_grad():
                        entry = [version, compute(buffer), shared]
                    self.log_entries[key] = entry
        entry[2] = entry[2] or shared
        return entry[1]

    def valid_log(self, key: str, version: tuple) -> torch.Tensor | None:
        """The cached log-table of bank ``key`` if it is valid for ``version``, else None."""
        entry = self.log_entries.get(key)
        return entry[1] if entry is not None and entry[0] == version else None

    def cached_linear(self, key: str, transposed: bool, version: tuple, compute) -> torch.Tensor:
        """The linear table ``key`` for raw-tensor stamp ``version``: ``compute(buffer)``
        writes it (into the previous entry's buffer when it fits) when stale."""
        entry = self.linear_entries.get((key, transposed))
        if entry is not None and entry[0] == version:
            return entry[1]
        with self.lock:
            entry = self.linear_entries.get((key, transposed))
            if entry is None or entry[0] != version:
                entry = [version, compute(entry[1] if entry is not None else None), None]
                self.linear_entries[(key, transposed)] = entry
        return entry[1]

    def recomputed_linear(self, key: str, version: tuple, compute) -> torch.Tensor:
        """The natural-layout linear table ``key`` recomputed now by ``compute(buffer)`` (the
        value a differentiable evaluation uses: never a stale cache, whatever wrote the
        parameters), into the cached entry's buffer without bumping its version counter, and
        then cached for ``version``. A graph still holding the buffer reads the same values:
        the parameters cannot change before its backward without an error (see
        :class:`pclayer.tables._RowSoftmax`)."""
        with self.lock:
            entry = self.linear_entries.get((key, False))
            buffer = None if entry is None else entry[1]
            table = compute(None if buffer is None else buffer.data)
            if buffer is None or table.data_ptr() != buffer.data_ptr():
                buffer = table
            self.linear_entries[(key, False)] = [version, buffer, None]
        return buffer

    def smallest_linear(self, key: str, transposed: bool, version: tuple) -> float:
        """The smallest entry of the cached linear table ``key`` (valid for ``version``),
        measured on first request (most evaluations never need it)."""
        entry = self.linear_entries[(key, transposed)]
        if entry[0] != version:
            raise RuntimeError(f"the linear table {key!r} is stale; read it with cached_linear first")
        if entry[2] is None:
            entry[2] = float(entry[1].amin()) if entry[1].numel() else 1.0
        return entry[2]

    def reused(self, entry: tuple, version: tuple) -> bool:
        """Whether the table ``entry`` (``("linear", key, transposed)`` or ``("log", key)``) of
        raw-tensor stamp ``version`` is cached, or was asked for before at this version (so it
        is worth building: a table much bigger than what one call reads pays off only when
        calls reuse it). Records this request."""
        if entry[0] == "linear":
            cached = self.linear_entries.get(entry[1:])
            if cached is not None and cached[0] == version:
                return True
        elif self.valid_log(entry[1], version) is not None:
            return True
        with self.lock:
            asked = self.requests.get(entry) == version
            self.requests[entry] = version
        return asked

    def parameters_updated(self, key: str, version: tuple, probabilities: torch.Tensor) -> None:
        """Parameter ``key`` was just written in place and ``probabilities`` (natural layout)
        is its new normalised table: write it into the existing linear entries of ``key``."""
        with self.lock:
            for transposed in (False, True):
                entry = self.linear_entries.get((key, transposed))
                if entry is None:
                    continue
                buffer = entry[1]
                source = probabilities.transpose(-1, -2) if transposed else probabilities
                if buffer.shape != source.shape or buffer.dtype != source.dtype or buffer.device != source.device:
                    del self.linear_entries[(key, transposed)]
                    continue
                buffer.copy_(source)
                self.linear_entries[(key, transposed)] = [version, buffer, None]

    def transposed_banks(self, key: str, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per bank of the linear sum table ``table`` (banks, N, C) its (C, N) transposed view;
        built once per buffer (recomputations write into the same buffer)."""
        entry = self.bank_views.get(key)
        if entry is None or entry[0] is not table:
            entry = (table, tuple(bank.t() for bank in table.unbind(0)))
            self.bank_views[key] = entry
        return entry[1]

    def natural_scratch(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A scratch buffer of ``shape`` with ``like``'s dtype and device (a table normalised in
        its natural layout before a transposed copy), reused across tables."""
        numel = math.prod(shape)
        scratch = self.scratch
        if scratch is None or scratch.numel() < numel or scratch.dtype != like.dtype or scratch.device != like.device:
            scratch = self.scratch = like.new_empty(numel)
        return scratch[:numel].view(shape)
