"""The compiled circuit: a ``torch.nn.Module`` that runs a :class:`~pclayer.compiler.Plan`."""

from __future__ import annotations

import torch
from torch import nn

from pclayer.compiler import Plan, build_plan
from pclayer.layers import InputLayer, LayerOutputs, ProductLayer, SumLayer
from pclayer.linear_tables import TableSource
from pclayer.nodes import NodeGroup
from pclayer.scaled import scaled_root_value
from pclayer.semiring import LOG_SUM, Semiring

_LAYER_TYPES = {"input": InputLayer, "product": ProductLayer, "sum": SumLayer}


class TensorCircuit(nn.Module):
    """A compiled probabilistic circuit over variables ``0..num_vars-1``.

    Parameters are unconstrained: ``sum_*`` and ``cat_*`` tensors hold log-weights that
    are normalised by a (log-)softmax on use, so any ``torch.optim`` optimizer can train
    them; ``gauss_*`` tensors hold (mean, log-std). Queries (``log_prob``, ``posterior``,
    ``sample``, ``mpe``) are thin wrappers of :mod:`pclayer.queries`.

    Attributes:
        num_vars: number of variables.
        var_cats: (num_vars,) LongTensor of categories per variable (0 = Gaussian).
        num_cats: largest category count: the K of soft evidence and posteriors.
    """

    def __init__(self, plan: Plan, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.plan = plan
        self.num_vars = plan.num_vars
        self.register_buffer("var_cats", torch.tensor(plan.var_cats, dtype=torch.long), persistent=False)
        self.num_cats = max(plan.var_cats) if plan.var_cats else 0
        self.has_gaussian = any(k == 0 for k in plan.var_cats)
        self.params = nn.ParameterDict({key: nn.Parameter(value.to(dtype)) for key, value in plan.params.items()})
        for key, value in plan.fixed.items():
            self.register_buffer(f"fixed_{key}", value.to(dtype) if value.is_floating_point() else value)
        self.layers = nn.ModuleList([_LAYER_TYPES[spec["type"]](spec) for spec in plan.layers])
        self.root = plan.root
        self.layer_widths = _layer_widths(plan)
        self.output_cuts = _output_cuts(self.layers, self.layer_widths)
        self.split_tables = sorted({key for layer in self.layers if isinstance(layer, SumLayer)
                                    for key, _ in layer.single_banks() if plan.params[key].shape[0] > 1})

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype if len(self.params) else self.fixed_dtype()

    def fixed_dtype(self) -> torch.dtype:
        floats = [b.dtype for b in self.buffers() if b.is_floating_point()]
        return floats[0] if floats else torch.float32

    @property
    def device(self) -> torch.device:
        return self.var_cats.device

    def num_parameters(self) -> int:
        """Number of free parameters (each normalised row counts its size minus one)."""
        total = 0
        for key, value in self.params.items():
            if key.startswith("gauss_"):
                total += value.numel()
            elif key.startswith("sparse_"):
                mask = getattr(self, f"fixed_{key}_mask")
                total += int(mask.sum()) - mask.shape[0]
            else:
                total += value.numel() - value[..., 0].numel()
        return total

    def log_tables(self) -> dict[str, torch.Tensor]:
        """Normalised log-parameters by bank key: sums (banks, N, C) or (N, F), categorical
        tables (banks, n, K), indicator tables, and Gaussian (banks, 2, n) as stored.

        When no gradient can flow to the parameters (grad mode off, or no parameter requires
        grad) and outside inference mode, the tables are computed once and reused until any
        parameter or buffer changes: the cache is keyed on every tensor's version counter
        (bumped by in-place updates: optimizer steps, EM, ``load_state_dict``), storage
        address, dtype, device and shape (``.to()``, ``.double()``). Writes through
        ``tensor.data`` bypass the version counter; call :meth:`clear_table_cache` after them.
        The cached tables must not be modified in place.
        """
        if not self._tables_cacheable():
            return self._compute_log_tables()
        key = self._table_cache_key()
        cached = self.__dict__.get("_table_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self._compute_log_tables())
            self.__dict__["_table_cache"] = cached
        return dict(cached[1])

    def _tables_cacheable(self) -> bool:
        """Whether normalised tables may come from the caches: no gradient can reach the
        parameters and inference mode is off."""
        differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in self.params.values())
        return not differentiable and not torch.is_inference_mode_enabled()

    def clear_table_cache(self) -> None:
        """Drop the cached normalised tables of :meth:`log_tables` and their linear copies."""
        self.__dict__.pop("_table_cache", None)
        self.__dict__.pop("_linear_tables", None)

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy`` leave the table caches behind (they are rebuilt on use)."""
        return {key: value for key, value in super().__getstate__().items()
                if key not in ("_table_cache", "_linear_tables", "_scaled_workspaces")}

    def _table_cache_key(self) -> tuple:
        return tuple((name, t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                     for name, t in [*self.params.items(), *self._buffers.items()])

    def _compute_log_tables(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in self.params.items():
            if key.startswith("sparse_"):
                mask = getattr(self, f"fixed_{key}_mask")
                out[key] = torch.log_softmax(value.masked_fill(~mask, -torch.inf), dim=-1)
            elif key.startswith("gauss_"):
                out[key] = value
            else:
                out[key] = torch.log_softmax(value, dim=-1)
        for name, value in self._buffers.items():
            if name.startswith("fixed_ind_"):
                out[name[len("fixed_"):]] = value
        return out

    def layer_values(self, x: torch.Tensor, missing: torch.Tensor | None, evidence: torch.Tensor | None,
                     semiring: Semiring = LOG_SUM, tables: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run every layer on validated inputs; returns each layer's (B, n_layer) log-values."""
        tables = self._with_bank_views(self.log_tables() if tables is None else tables)
        values = LayerOutputs(self.output_cuts)
        values.add(self.layers[0](tables, x, missing, evidence, semiring))
        for layer in self.layers[1:]:
            if isinstance(layer, SumLayer):
                values.add(layer(values, tables, semiring))
            else:
                values.add(layer(values, semiring))
        return values

    def root_value(self, values: list[torch.Tensor]) -> torch.Tensor:
        """(B,) value of the root node."""
        layer, index = self.root
        return values[layer][:, index]

    def root_log_value(self, x: torch.Tensor, missing: torch.Tensor | None, evidence: torch.Tensor | None,
                       tables: dict[str, torch.Tensor] | None = None, *,
                       constant_parameters: bool = False) -> torch.Tensor:
        """(B,) root log-values (log-sum semiring) on validated inputs: computed in scaled linear
        space (:mod:`pclayer.scaled`) where that is exact, else by :meth:`layer_values`.

        ``constant_parameters``: read the parameters as constants (from the table caches) even
        when gradients are enabled, for gradients with respect to the evidence only."""
        cached = tables is None and (self._tables_cacheable() or (constant_parameters and not torch.is_inference_mode_enabled()))
        if cached:
            source = TableSource(self, None)  # linear tables straight from the parameters
        else:
            tables = self.log_tables() if tables is None else tables
            source = TableSource(self, self._with_bank_views(tables))
        value = scaled_root_value(self, source, x, missing, evidence)
        if value is not None:
            return value
        return self.root_value(self.layer_values(x, missing, evidence, tables=source.log))

    def _with_bank_views(self, tables: dict[str, torch.Tensor]) -> dict:
        """``tables`` plus, when gradients flow, an unbound view (key, bank) per bank of the
        stacked tables that layers read one bank at a time: autograd then stacks their
        gradients once instead of building one full-size zero tensor per layer."""
        if not (torch.is_grad_enabled() and any(tables[key].requires_grad for key in self.split_tables)):
            return tables
        tables = dict(tables)
        for key in self.split_tables:
            tables.update({(key, bank): view for bank, view in enumerate(tables[key].unbind(0))})
        return tables

    def forward(self, x: torch.Tensor, missing: torch.Tensor | None = None,
                soft_evidence: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, missing=missing, soft_evidence=soft_evidence)

    def log_prob(self, x, missing=None, soft_evidence=None):
        from pclayer.queries import log_prob

        return log_prob(self, x, missing=missing, soft_evidence=soft_evidence)

    def posterior(self, x, missing=None, soft_evidence=None):
        from pclayer.queries import posterior

        return posterior(self, x, missing=missing, soft_evidence=soft_evidence)

    def sample(self, num_samples=None, *, x=None, missing=None, soft_evidence=None, generator=None, return_nodes=False):
        from pclayer.queries import sample

        return sample(self, num_samples, x=x, missing=missing, soft_evidence=soft_evidence,
                      generator=generator, return_nodes=return_nodes)

    def mpe(self, x, missing=None, soft_evidence=None):
        from pclayer.queries import mpe

        return mpe(self, x, missing=missing, soft_evidence=soft_evidence)

    def extra_repr(self) -> str:
        kinds = [type(layer).__name__ for layer in self.layers]
        return f"num_vars={self.num_vars}, num_cats={self.num_cats}, layers={len(kinds)}, parameters={self.num_parameters()}"


def _layer_widths(plan: Plan) -> list[int]:
    """Number of nodes (output columns) of every layer of ``plan``."""
    widths = []
    for spec in plan.layers:
        if spec["type"] == "input":
            widths.append(sum(b["num_nodes"] * b["group_bank"].numel() for b in spec["buckets"]))
        elif spec["type"] == "product":
            widths.append(spec["children"].shape[0])
        else:
            dense = sum(b["children"].shape[0] * plan.params[b["key"]].shape[1] for b in spec["dense"])
            widths.append(dense + sum(b["children"].shape[0] for b in spec["sparse"]))
    return widths


def _output_cuts(layers: nn.ModuleList, widths: list[int]) -> dict[int, list[int]]:
    """Piece widths per layer output that later layers read in two or more partial column
    ranges: the ranges' ends cut the output into pieces (see :class:`LayerOutputs`)."""
    ranges: dict[int, set[tuple[int, int]]] = {}
    for layer in layers[1:]:
        for source, start, length in layer.reads():
            ranges.setdefault(source, set()).add((start, length))
    cuts = {}
    for source, spans in ranges.items():
        width = widths[source]
        partial = {(s, n) for s, n in spans if (s, n) != (0, width)}
        if len(partial) < 2:
            continue
        ends = sorted({0, width} | {s for s, _ in partial} | {s + n for s, n in partial})
        cuts[source] = [b - a for a, b in zip(ends, ends[1:])]
    return cuts


def compile(root: NodeGroup, dtype: torch.dtype = torch.float32) -> TensorCircuit:  # noqa: A001
    """Compile the symbolic circuit rooted at ``root`` into a :class:`TensorCircuit`.

    Args:
        root: a node group with exactly one node covering variables ``0..V-1``.
        dtype: parameter dtype (``torch.float32`` or ``torch.float64``); ``.double()``
            converts later too.
    """
    return TensorCircuit(build_plan(root), dtype=dtype)
