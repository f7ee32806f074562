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

from pclayer.runtime import stamp


def bank_stamp(circuit, key: str) -> tuple:
    """The version of bank ``key``'s stored tensor (and its fixed mask): what every cached
    table of the bank is valid for (see :func:`pclayer.runtime.stamp`)."""
    bank = circuit.plan.banks[key]
    mask = circuit.fixed_tensor(bank.mask) if bank.mask else None
    return stamp(circuit.bank_tensor(key).detach(), mask)


def normalise_log(circuit, key: str, raw: torch.Tensor) -> torch.Tensor:
    """Normalised log-table of bank ``key`` from its stored tensor ``raw``."""
    bank = circuit.plan.banks[key]
    if bank.role == "dense_sum":
        return torch.log_softmax(raw, dim=-1)
    if bank.role == "sparse_sum":
        return torch.log_softmax(raw.masked_fill(~circuit.fixed_tensor(bank.mask), -torch.inf), dim=-1)
    distribution = circuit.bank_distribution(key)
    return distribution.log_table(raw) if distribution.tabular else raw


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


class Tables:
    """The normalised tables of one evaluation.

    ``log`` maps bank keys to normalised log-tables (plus, under autograd, unbound per-bank
    views ``(key, bank)``); :meth:`linear` gives probabilities. Built from explicit
    log-tables, from the parameters (:class:`ParameterLogTables`: :meth:`linear` then
    normalises the parameters directly, differentiably), or with ``log=None`` from the
    circuit's caches (valid only when no gradient can reach the parameters)."""

    def __init__(self, circuit, log: Mapping | None):
        self.circuit = circuit
        self.cached = log is None
        self._log = log
        self._memo: dict[tuple[str, bool], tuple[torch.Tensor, float]] = {}

    @property
    def log(self) -> Mapping:
        if self._log is None:
            with torch.no_grad():  # cached tables are constants (the runtime's cache serves them)
                self._log = self.circuit.log_tables()
        return self._log

    def linear(self, key: str, transposed: bool = False) -> tuple[torch.Tensor, float]:
        """Probabilities of bank ``key`` and their smallest entry (a float). ``transposed``: a
        3-d table (banks, R, C) comes as the contiguous (banks, C, R), so that one (bank,
        category) of a categorical table is one contiguous row."""
        found = self._memo.get((key, transposed))
        if found is not None:
            return found
        if self.cached:
            found = self._cached_linear(key, transposed)
        else:
            if isinstance(self._log, ParameterLogTables):  # straight from the parameters: no log-table pass
                linear = normalise_linear(self.circuit, key, self.circuit.bank_tensor(key), None)
            else:
                linear = torch.exp(self.log[key])
            linear = linear.transpose(1, 2).contiguous() if transposed else linear
            found = (linear, float(linear.detach().amin()) if linear.numel() else 1.0)
        self._memo[(key, transposed)] = found
        return found

    def linear_if_reused(self, key: str, transposed: bool = False) -> tuple[torch.Tensor, float] | None:
        """:meth:`linear` when the table is cached, or was asked for at the same parameter
        version by an earlier evaluation (see :meth:`pclayer.runtime.Runtime.linear_reused`);
        None otherwise (and for explicit tables): the caller then reads only the entries it
        needs from the log-tables."""
        if not self.cached:
            return None
        if (key, transposed) not in self._memo and not self.circuit.runtime.linear_reused(key, transposed,
                                                                                        bank_stamp(self.circuit, key)):
            return None
        return self.linear(key, transposed)

    def _cached_linear(self, key: str, transposed: bool) -> tuple[torch.Tensor, float]:
        circuit = self.circuit
        raw = circuit.bank_tensor(key).detach()
        runtime = circuit.runtime

        def compute(buffer: torch.Tensor | None) -> torch.Tensor:  # runs only when the entry is stale
            natural_shape = table_shape(circuit, key, raw)
            shape = (natural_shape[0], natural_shape[2], natural_shape[1]) if transposed else natural_shape
            if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != raw.dtype or buffer.device != raw.device:
                buffer = raw.new_empty(shape)
            if not transposed:
                return normalise_linear(circuit, key, raw, buffer)
            natural = normalise_linear(circuit, key, raw, runtime.natural_scratch(natural_shape, raw))
            return buffer.copy_(natural.transpose(1, 2))

        return runtime.cached_linear(key, transposed, bank_stamp(circuit, key), compute)

    def bank_weights(self, key: str, bank: int) -> torch.Tensor:
        """(C, N) probabilities of bank ``bank`` of the dense sum table ``key`` (banks, N, C):
        a transposed view for ``x @ w`` (from the caches only)."""
        return self.circuit.runtime.transposed_banks(key, self.linear(key)[0])[bank]
