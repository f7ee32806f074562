"""Normalised parameter tables of one evaluation, in log space and in linear space.

Every bank of the plan (:class:`~pclayer.plan.Bank`) is normalised by its role: sums by a
(masked) softmax over their children, inputs by their distribution
(:meth:`~pclayer.distributions.Distribution.log_table`; continuous banks are used as
stored). :class:`Tables` gives one evaluation its tables, either from the circuit's
:class:`~pclayer.runtime.Runtime` caches (only when no gradient can reach the parameters)
or from explicit, possibly differentiable, log-tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pclayer.distributions import Categorical
from pclayer.runtime import stamp


def bank_stamp(circuit, key: str) -> tuple:
    """The version of bank ``key``'s stored tensor (and its fixed mask): what every cached
    table of the bank is valid for (see :func:`pclayer.runtime.stamp`)."""
    bank = circuit.plan.banks[key]
    mask = circuit.fixed_tensor(bank.mask) if bank.mask else None
    return stamp(circuit.bank_tensor(key).detach(), mask)


def normalise_log(circuit, key: str, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised log-table of bank ``key`` from its stored tensor ``raw`` (into ``out``, a
    buffer of the table's shape, when given: then not differentiable; continuous banks are
    their stored tensor and ignore it)."""
    bank = circuit.plan.banks[key]
    if bank.role in ("dense_sum", "sparse_sum"):
        if bank.role == "sparse_sum":
            raw = raw.masked_fill(~circuit.fixed_tensor(bank.mask), -torch.inf)
        return torch.log_softmax(raw, dim=-1) if out is None else torch._log_softmax(raw, -1, False, out=out)
    distribution = circuit.bank_distribution(key)
    if not distribution.tabular:
        return raw
    return distribution.log_table(raw) if out is None else distribution.log_table_into(raw, out)


def table_shape(circuit, key: str, raw: torch.Tensor) -> tuple[int, ...]:
    """Shape of the normalised table of bank ``key`` stored as ``raw``."""
    bank = circuit.plan.banks[key]
    if bank.role == "input":
        return circuit.bank_distribution(key).table_shape(tuple(raw.shape))
    return tuple(raw.shape)


def normalise_linear(circuit, key: str, raw: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Probabilities of bank ``key`` (natural layout) from its stored tensor, into ``out``."""
    bank = circuit.plan.banks[key]
    if bank.role == "dense_sum":
        return torch.softmax(raw, dim=-1, out=out)
    if bank.role == "sparse_sum":
        return torch.softmax(raw.masked_fill(~circuit.fixed_tensor(bank.mask), -torch.inf), dim=-1, out=out)
    return circuit.bank_distribution(key).linear_table(raw, out=out)


class ParameterLogTables(Mapping):
    """The normalised log-tables of a circuit's current parameters, each computed (and
    differentiable) on first access, so an evaluation normalises only the banks it reads in
    log space. With ``bank_views``, ``(key, bank)`` gives an unbound per-bank view of a table
    that sum layers read one bank at a time (:attr:`TensorCircuit.split_tables`): autograd then
    stacks their gradients once instead of building a full-size zero tensor per reader."""

    def __init__(self, circuit, bank_views: bool):
        self.circuit = circuit
        self.bank_views = bank_views
        self._memo: dict = {}

    def __getitem__(self, key):
        found = self._memo.get(key)
        if found is not None:
            return found
        if isinstance(key, tuple):
            name, bank = key
            if not self.bank_views or name not in self.circuit.split_tables:
                raise KeyError(key)
            for index, view in enumerate(self[name].unbind(0)):
                self._memo[(name, index)] = view
            return self._memo[key]
        if key not in self.circuit.plan.banks:
            raise KeyError(key)
        found = self._memo[key] = normalise_log(self.circuit, key, self.circuit.bank_tensor(key))
        return found

    def __iter__(self):
        yield from self.circuit.plan.banks
        if self.bank_views:
            for name in self.circuit.split_tables:
                yield from ((name, bank) for bank in range(self.circuit.bank_tensor(name).shape[0]))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _fitting(buffer: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``buffer`` when it has ``shape`` and ``like``'s dtype and device (a table's previous
    memory, rewritten in place), else a new uninitialised tensor."""
    if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != like.dtype or buffer.device != like.device:
        return like.new_empty(shape)
    return buffer


class CachedLogTables(Mapping):
    """The circuit's normalised log-tables from its runtime's cache: each bank is normalised
    (without autograd) on first access at its current parameter version, so an evaluation
    pays only for the banks it reads in log space."""

    def __init__(self, circuit):
        self.circuit = circuit

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.table(key, shared=False)

    def table(self, key: str, shared: bool) -> torch.Tensor:
        """The cached log-table of bank ``key``. ``shared``: it is handed to the caller beyond
        one evaluation (:meth:`TensorCircuit.log_tables`), so a later version is never
        written into its memory; otherwise the next version reuses the buffer."""
        circuit = self.circuit
        if key not in circuit.plan.banks:
            raise KeyError(key)
        raw = circuit.bank_tensor(key).detach()

        def compute(buffer: torch.Tensor | None) -> torch.Tensor:
            if circuit.plan.banks[key].role == "input" and not circuit.bank_distribution(key).tabular:
                return raw  # continuous banks are used as stored
            return normalise_log(circuit, key, raw, _fitting(buffer, table_shape(circuit, key, raw), raw))

        return circuit.runtime.cached_log(key, bank_stamp(circuit, key), compute, shared)

    def __iter__(self):
        return iter(self.circuit.plan.banks)

    def __len__(self) -> int:
        return len(self.circuit.plan.banks)


class Tables:
    """The normalised tables of one evaluation.

    ``log`` maps bank keys to normalised log-tables (plus, under autograd, unbound per-bank
    views ``(key, bank)``); :meth:`linear` gives probabilities; :meth:`log_rows` and
    :meth:`log_entries` read rows or entries of a tabular input's log-table without building
    the whole table unless it is at hand. Built from explicit log-tables, from the parameters
    (:class:`ParameterLogTables`: :meth:`linear` then normalises the parameters directly,
    differentiably), or with ``log=None`` from the circuit's caches (valid only when no
    gradient can reach the parameters). Cached tables serve this evaluation: an evaluation
    after a parameter update rewrites their memory (:meth:`TensorCircuit.log_tables` gives
    tables that are never rewritten)."""

    def __init__(self, circuit, log: Mapping | None):
        self.circuit = circuit
        self.cached = log is None
        self._log = CachedLogTables(circuit) if log is None else log
        self._memo: dict[tuple[str, bool], torch.Tensor] = {}
        self._smallest: dict[tuple[str, bool], float] = {}
        self._whole_log: dict[str, torch.Tensor | None] = {}

    @property
    def log(self) -> Mapping:
        return self._log

    def linear(self, key: str, transposed: bool = False) -> torch.Tensor:
        """Probabilities of bank ``key``. ``transposed``: a 3-d table (banks, R, C) comes as the
        contiguous (banks, C, R), so that one (bank, category) of a categorical table is one
        contiguous row."""
        found = self._memo.get((key, transposed))
        if found is not None:
            return found
        if self.cached:
            found = self._cached_linear(key, transposed)
        else:
            if isinstance(self._log, ParameterLogTables):  # straight from the parameters: no log-table pass
                found = self._differentiable_linear(key)
            else:
                found = torch.exp(self.log[key])
            found = found.transpose(1, 2).contiguous() if transposed else found
        self._memo[(key, transposed)] = found
        return found

    def smallest(self, key: str, transposed: bool = False) -> float:
        """The smallest entry of :meth:`linear` (measured once per parameter version)."""
        found = self._smallest.get((key, transposed))
        if found is None:
            table = self.linear(key, transposed)
            if self.cached:
                found = self.circuit.runtime.smallest_linear(key, transposed, bank_stamp(self.circuit, key))
            else:
                found = float(table.detach().amin()) if table.numel() else 1.0
            self._smallest[(key, transposed)] = found
        return found

    def linear_if_reused(self, key: str, transposed: bool = False) -> torch.Tensor | None:
        """:meth:`linear` when the table is cached, or was asked for at the same parameter
        version by an earlier evaluation (see :meth:`pclayer.runtime.Runtime.reused`); None
        otherwise (and for explicit tables): the caller then reads only the entries it needs
        from the log-tables."""
        if not self.cached:
            return None
        if (key, transposed) not in self._memo and not self.circuit.runtime.reused(("linear", key, transposed),
                                                                                   bank_stamp(self.circuit, key)):
            return None
        return self.linear(key, transposed)

    def log_rows(self, key: str, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(A, K) log-probabilities of rows ``rows`` (A,) of the log-table of tabular input
        bank ``key`` flattened to (banks * n, K), into ``out`` when given. Read from the whole
        table when it is at hand (see :meth:`_whole_log_table`); otherwise only these rows are
        normalised (every tabular distribution normalises each node's row on its own), which
        a cold call after an optimizer step needs instead of a pass over the whole table."""
        table = self._whole_log_table(key)
        if table is not None:
            flat = table.reshape(-1, table.shape[-1])
            return flat.index_select(0, rows) if out is None else torch.index_select(flat, 0, rows, out=out)
        raw = self.circuit.bank_tensor(key)
        raw = raw.detach() if self.cached else raw
        flat = raw.reshape(-1, *raw.shape[2:])
        distribution = self.circuit.bank_distribution(key)
        if out is None or raw.requires_grad:
            return distribution.log_table(flat.index_select(0, rows).unsqueeze(0))[0]
        if flat.shape[1:] == out.shape[1:]:  # rows stored as wide as the table: normalised in place in ``out``
            picked = torch.index_select(flat, 0, rows, out=out).unsqueeze(0)
        else:
            picked = flat.index_select(0, rows).unsqueeze(0)
        distribution.log_table_into(picked, out.unsqueeze(0))
        return out

    def log_entries(self, key: str, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """(A, k) log-probabilities at ``columns`` (A, k), each in ``[0, K)``, of rows ``rows``
        (A,) of tabular input bank ``key``'s log-table (see :meth:`log_rows`)."""
        table = self._whole_log_table(key)
        if table is not None:
            return table.reshape(-1)[rows.unsqueeze(1) * table.shape[-1] + columns]
        return self.log_rows(key, rows).gather(1, columns)

    def _whole_log_table(self, key: str) -> torch.Tensor | None:
        """The whole log-table of bank ``key`` when this evaluation may read it: explicit
        tables, a table already normalised by this evaluation, or a cached table that is valid
        or worth building because an earlier evaluation asked for it at the same parameter
        version (decided once per evaluation). None: normalise only the rows read."""
        if key in self._whole_log:
            return self._whole_log[key]
        if self.cached:
            found = self.log[key] if self.circuit.runtime.reused(("log", key), bank_stamp(self.circuit, key)) else None
        elif isinstance(self._log, ParameterLogTables):
            found = self._log._memo.get(key)
        else:
            found = self._log[key]
        self._whole_log[key] = found
        return found

    def linear_columns(self, key: str, columns: torch.Tensor) -> torch.Tensor:
        """(banks, R, len(columns)) columns ``columns`` (int64, repeats allowed) of the linear
        table (banks, R, C) of bank ``key``. Under autograd, for a row softmax, the gradient
        reaches the parameters in one pass over the table (:class:`_SoftmaxColumns`) instead of
        through a table-size zero tensor."""
        unique, inverse = torch.unique(columns, return_inverse=True)  # each column read once, in order
        if self.cached or not self._buffered_softmax(key):
            return self.linear(key).index_select(-1, unique).index_select(-1, inverse)
        return _SoftmaxColumns.apply(self.circuit.bank_tensor(key), self._recomputed_linear(key), unique, inverse)

    def _buffered_softmax(self, key: str) -> bool:
        """Whether bank ``key``'s linear table is a plain softmax over its last dimension that
        may be computed into the runtime's buffer (not in inference mode: no runtime buffer
        may hold an inference tensor)."""
        if torch.is_inference_mode_enabled():
            return False
        bank = self.circuit.plan.banks[key]
        return bank.role == "dense_sum" or (bank.role == "input" and isinstance(self.circuit.bank_distribution(key), Categorical))

    def _recomputed_linear(self, key: str) -> torch.Tensor:
        """The row softmax of bank ``key``'s parameters, computed now (without autograd) into
        the runtime's reused buffer (see :meth:`pclayer.runtime.Runtime.recomputed_linear`)."""
        circuit = self.circuit
        raw = circuit.bank_tensor(key).detach()

        def compute(buffer: torch.Tensor | None) -> torch.Tensor:
            return normalise_linear(circuit, key, raw, _fitting(buffer, tuple(raw.shape), raw))

        return circuit.runtime.recomputed_linear(key, bank_stamp(circuit, key), compute)

    def _differentiable_linear(self, key: str) -> torch.Tensor:
        """Probabilities of bank ``key`` that gradients flow through to its parameters. A
        row softmax (dense sums, categorical inputs) is computed into the runtime's linear
        table buffer (reused from step to step: no table-size allocation; then also valid for
        no-grad calls at these parameters) and takes its gradient from :class:`_RowSoftmax`."""
        raw = self.circuit.bank_tensor(key)
        if not self._buffered_softmax(key):
            return normalise_linear(self.circuit, key, raw, None)
        return _RowSoftmax.apply(raw, self._recomputed_linear(key))

    def _cached_linear(self, key: str, transposed: bool) -> torch.Tensor:
        circuit = self.circuit
        raw = circuit.bank_tensor(key).detach()
        runtime = circuit.runtime

        def compute(buffer: torch.Tensor | None) -> torch.Tensor:  # runs only when the entry is stale
            natural_shape = table_shape(circuit, key, raw)
            shape = (natural_shape[0], natural_shape[2], natural_shape[1]) if transposed else natural_shape
            buffer = _fitting(buffer, shape, raw)
            if not transposed:
                return normalise_linear(circuit, key, raw, buffer)
            natural = normalise_linear(circuit, key, raw, runtime.natural_scratch(natural_shape, raw))
            return buffer.copy_(natural.transpose(1, 2))

        return runtime.cached_linear(key, transposed, bank_stamp(circuit, key), compute)

    def bank_weights(self, key: str, bank: int) -> torch.Tensor:
        """(C, N) probabilities of bank ``bank`` of the dense sum table ``key`` (banks, N, C):
        a transposed view for ``x @ w`` (from the caches only)."""
        return self.circuit.runtime.transposed_banks(key, self.linear(key))[bank]


class _RowSoftmax(torch.autograd.Function):
    """``softmax(raw, -1)`` whose value ``table`` was computed without autograd (into a reused
    buffer). Backward: ``table * (grad - sum(table * grad, -1))``, in place on the incoming
    gradient when it is a plain contiguous tensor (the table-size gradients of a big
    vocabulary cost more in fresh memory than in arithmetic). ``raw`` is saved so that an
    in-place change of the parameters before the backward raises, as for any torch op."""

    @staticmethod
    def forward(ctx, raw: torch.Tensor, table: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(raw, table)  # raw: changing the parameters before backward raises
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        _, table = ctx.saved_tensors
        if grad.is_contiguous() and grad._base is None and not grad.requires_grad:
            product = grad.mul_(table)  # table * grad, then minus table * (its row sums)
            return product.addcmul_(table, product.sum(-1, keepdim=True), value=-1.0), None
        product = grad * table
        return product - table * product.sum(-1, keepdim=True), None


class _SoftmaxColumns(torch.autograd.Function):
    """``softmax(raw, -1)[..., unique][..., inverse]`` (``unique`` sorted distinct columns)
    whose full value ``table`` was computed without autograd. Backward in one pass over the
    table: ``grad_raw = -table * sum(g * table[unique]) + (g * table[unique] added at unique)``
    with ``g`` the gradient summed per distinct column."""

    @staticmethod
    def forward(ctx, raw: torch.Tensor, table: torch.Tensor, unique: torch.Tensor,  # type: ignore[override]
                inverse: torch.Tensor) -> torch.Tensor:
        picked = table.index_select(-1, unique)
        ctx.save_for_backward(raw, table, unique, inverse, picked)
        return picked.index_select(-1, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        _, table, unique, inverse, picked = ctx.saved_tensors
        weighted = torch.zeros_like(picked).index_add_(-1, inverse, grad).mul_(picked)
        grad_raw = torch.mul(table, weighted.sum(-1, keepdim=True).neg_())
        return grad_raw.index_add_(-1, unique, weighted), None, None, None
