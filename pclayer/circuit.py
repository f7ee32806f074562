"""The compiled circuit: a ``torch.nn.Module`` that runs a :class:`~pclayer.plan.Plan`."""

from __future__ import annotations

import torch
from torch import nn

from pclayer.compiler import build_plan
from pclayer.distributions import Distribution, distribution_for_bucket
from pclayer.layers import LAYER_TYPES, SumLayer
from pclayer.nodes import NodeGroup
from pclayer.ops.dispatch import check_backend
from pclayer.passes import optimize as optimize_plan
from pclayer.plan import InputLayerSpec, Plan
from pclayer.representations import SCALED
from pclayer.runtime import Runtime
from pclayer.tables import CachedLogTables, ParameterLogTables, Tables, bank_stamp, normalise_log
from pclayer.traversal import LayerValues, traverse


class TensorCircuit(nn.Module):
    """A compiled probabilistic circuit over variables ``0..num_vars-1``.

    Parameters are unconstrained: sum banks (``sum_*``, ``sparse_*``) hold log-weights
    normalised by a (log-)softmax on use, and input banks hold what their distribution
    stores (log-weights for categorical tables, logits for binomials, mean and log-std for
    Gaussians), so any ``torch.optim`` optimizer can train them. Queries (``log_prob``,
    ``posterior``, ``sample``, ``mpe``) are thin wrappers of :mod:`pclayer.queries`.

    Args:
        plan: a compiled plan (optimised or plain; see :func:`compile`).
        dtype: parameter dtype.
        backend: where dispatched operations run: ``"auto"``, ``"torch"`` or ``"cuda"``.

    Attributes:
        num_vars: number of variables.
        var_cats: (num_vars,) LongTensor of categories per variable (0 = continuous).
        num_cats: largest category count: the K of soft evidence and posteriors.
        runtime: the :class:`~pclayer.runtime.Runtime` owning caches and workspaces.
    """

    def __init__(self, plan: Plan, dtype: torch.dtype = torch.float32, backend: str = "auto"):
        super().__init__()
        self.plan = plan
        self.runtime = Runtime(check_backend(backend))
        self.num_vars = plan.num_vars
        self.register_buffer("var_cats", torch.tensor(plan.var_cats, dtype=torch.long), persistent=False)
        self.num_cats = max(plan.var_cats) if plan.var_cats else 0
        self.has_continuous = any(k == 0 for k in plan.var_cats)
        self.params = nn.ParameterDict({key: nn.Parameter(value.to(dtype)) for key, value in plan.params.items()})
        for key, value in plan.fixed.items():
            self.register_buffer(f"fixed_{key}", value.to(dtype) if value.is_floating_point() else value)
        self.layers = nn.ModuleList([LAYER_TYPES[type(spec)](spec) for spec in plan.layers])
        self.layer_sequence = tuple(self.layers)  # the same modules, indexed without ModuleList's overhead
        self.root = plan.root
        self.layer_widths = [plan.layer_width(i) for i in range(len(plan.layers))]
        self.output_cuts = _output_cuts(self.layers, self.layer_widths)
        self.split_tables = sorted({key for layer in self.layers if isinstance(layer, SumLayer)
                                    for key, _ in layer.single_banks() if plan.params[key].shape[0] > 1})
        self._distributions = {bucket.key: distribution_for_bucket(bucket.distribution, bucket.num_cats)
                               for spec in plan.layers if isinstance(spec, InputLayerSpec) for bucket in spec.buckets}

    @property
    def dtype(self) -> torch.dtype:
        if len(self.params):
            return next(iter(self.params.values())).dtype
        floats = [b.dtype for b in self.buffers() if b.is_floating_point()]
        return floats[0] if floats else torch.float32

    @property
    def device(self) -> torch.device:
        return self.var_cats.device

    def bank_tensor(self, key: str) -> torch.Tensor:
        """The stored tensor of bank ``key``: a parameter, or a fixed table."""
        return self.params[key] if key in self.params else getattr(self, f"fixed_{key}")

    def fixed_tensor(self, key: str) -> torch.Tensor:
        """Fixed (non-learnable) tensor ``key`` of the plan (indicator tables, sparse masks)."""
        return getattr(self, f"fixed_{key}")

    def bank_distribution(self, key: str) -> Distribution:
        """The input distribution behind input bank ``key``."""
        return self._distributions[key]

    def num_parameters(self) -> int:
        """Number of free parameters (each normalised row counts its size minus one)."""
        total = 0
        for key, value in self.params.items():
            bank = self.plan.banks[key]
            if bank.role == "sparse_sum":
                mask = self.fixed_tensor(bank.mask)
                total += int(mask.sum()) - mask.shape[0]
            elif bank.role == "dense_sum":
                total += value.numel() - value[..., 0].numel()
            else:
                total += self.bank_distribution(key).num_free_parameters(value)
        return total

    # --- tables and runtime state --------------------------------------------------------
    def log_tables(self) -> dict[str, torch.Tensor]:
        """Normalised tables by bank key: sums (banks, N, C) or (N, F) log-weights, tabular
        inputs (banks, n, K) log-probabilities, continuous inputs as stored.

        When no gradient can flow to the parameters (grad mode off, or no parameter requires
        grad) and outside inference mode, the tables come from the runtime's cache, valid
        while no parameter or buffer changes (version counter, storage, dtype, device,
        shape). Writes through ``tensor.data`` bypass the version counter; call
        :meth:`clear_table_cache` after them. The cached tables must not be modified in place.
        """
        if not self._tables_cacheable():
            return self._compute_log_tables()
        cached = CachedLogTables(self)
        return {key: cached.table(key, shared=True) for key in self.plan.banks}

    def _tables_cacheable(self) -> bool:
        differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in self.params.values())
        return not differentiable and not torch.is_inference_mode_enabled()

    def _compute_log_tables(self) -> dict[str, torch.Tensor]:
        return {key: normalise_log(self, key, self.bank_tensor(key)) for key in self.plan.banks}

    def clear_table_cache(self) -> None:
        """Drop every cached table and workspace of the runtime (rebuilt on use)."""
        self.runtime.clear()

    def parameters_updated(self, key: str, probabilities: torch.Tensor) -> None:
        """Tell the runtime that parameter ``key`` was just written in place and that
        ``probabilities`` (its natural layout) is its new normalised table (the M-step does)."""
        self.runtime.parameters_updated(key, bank_stamp(self, key), probabilities)

    def tables(self, tables: dict[str, torch.Tensor] | None = None, *, constant_parameters: bool = False) -> Tables:
        """The tables of one evaluation: cached when no gradient can reach the parameters (or
        ``constant_parameters``), else ``tables`` or fresh differentiable log-tables."""
        cached = tables is None and (self._tables_cacheable() or (constant_parameters and not torch.is_inference_mode_enabled()))
        if cached:
            return Tables(self, None)
        if tables is None:
            views = self.plan.optimized and torch.is_grad_enabled() and any(
                self.params[key].requires_grad for key in self.split_tables if key in self.params)
            return Tables(self, ParameterLogTables(self, bank_views=views))
        return Tables(self, self._with_bank_views(tables))

    def _with_bank_views(self, tables: dict) -> dict:
        """``tables`` plus, when gradients flow, an unbound view (key, bank) per bank of the
        stacked tables that layers read one bank at a time: autograd then stacks their
        gradients once instead of building one full-size zero tensor per layer."""
        if not (self.plan.optimized and torch.is_grad_enabled()
                and any(tables[key].requires_grad for key in self.split_tables)):
            return tables
        tables = dict(tables)
        for key in self.split_tables:
            tables.update({(key, bank): view for bank, view in enumerate(tables[key].unbind(0))})
        return tables

    # --- evaluation ----------------------------------------------------------------------
    def evaluate(self, representation, x: torch.Tensor, missing: torch.Tensor | None, evidence,
                 tables: Tables | None = None, keep: bool = False) -> LayerValues:
        """Every layer's values on validated inputs, in ``representation`` (see
        :func:`pclayer.traversal.traverse`)."""
        return traverse(self, representation, x, missing, evidence, self.tables() if tables is None else tables, keep)

    def root_log_value(self, x: torch.Tensor, missing: torch.Tensor | None, evidence,
                       tables: dict[str, torch.Tensor] | None = None, *,
                       constant_parameters: bool = False) -> torch.Tensor:
        """(B,) root log-values on validated inputs (scaled representation, exact).

        ``tables``: explicit normalised log-tables (e.g. leaves for flows).
        ``constant_parameters``: read the parameters as constants (from the caches) even when
        gradients are enabled, for gradients with respect to the evidence only."""
        source = self.tables(tables, constant_parameters=constant_parameters)
        return traverse(self, SCALED, x, missing, evidence, source).root(self)

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
        return (f"num_vars={self.num_vars}, num_cats={self.num_cats}, layers={len(self.layers)}, "
                f"parameters={self.num_parameters()}, optimized={self.plan.optimized}")


def _output_cuts(layers: nn.ModuleList, widths: list[int]) -> dict[int, list[int]]:
    """Piece widths per layer output that later layers read in two or more partial column
    ranges: the ranges' ends cut the output into pieces (see :class:`pclayer.layers.LayerOutputs`)."""
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


def compile(root: NodeGroup, dtype: torch.dtype = torch.float32, *, optimize: bool = True,  # noqa: A001
            backend: str = "auto") -> TensorCircuit:
    """Compile the symbolic circuit rooted at ``root`` into a :class:`TensorCircuit`.

    Args:
        root: a node group with exactly one node covering variables ``0..V-1``.
        dtype: parameter dtype (``torch.float32`` or ``torch.float64``); ``.double()``
            converts later too.
        optimize: run the optimisation passes of :mod:`pclayer.passes` (same results, fewer
            copies); ``False`` gives the plain program.
        backend: where dispatched operations run (``"auto"``, ``"torch"`` or ``"cuda"``;
            see :mod:`pclayer.ops.dispatch`).
    """
    plan = build_plan(root)
    return TensorCircuit(optimize_plan(plan) if optimize else plan, dtype=dtype, backend=backend)
