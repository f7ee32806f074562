"""Exact unconditional, conditional and soft-evidence sampling."""

from __future__ import annotations

import torch

from pclayer.layers import Chooser
from pclayer.ops import dispatch
from pclayer.queries.evidence import prepare, require_positive
from pclayer.representations import SCALED
from pclayer.tables import Tables, bank_stamp
from pclayer.topdown import top_down
from pclayer.topk import TopKEvidence


class SampleResult:
    """Samples with the latent choice behind each variable.

    Attributes:
        x: (B, num_vars) samples.
        node: (B, num_vars) index (within the input layer) of the input node that produced
            each variable.
    """

    def __init__(self, circuit, x: torch.Tensor, node: torch.Tensor, tables: Tables):
        self.x, self.node = x, node
        self._circuit, self._tables = circuit, tables
        self._versions = _input_versions(circuit)
        self._full: torch.Tensor | None = None

    def __iter__(self):
        """Unpacks as ``x, node, node_log_probs``."""
        return iter((self.x, self.node, self.node_log_probs))

    @property
    def node_log_probs(self) -> torch.Tensor:
        """(B, num_vars, num_cats) log-probabilities of each variable's input node's
        distribution (``-inf`` beyond the variable's categories; unused for continuous
        variables), computed on first access."""
        if self._full is None:
            batch, num_vars = self.node.shape
            self._full = self._read(self.node.reshape(-1), None, None).view(batch, num_vars, -1)
        return self._full

    def node_log_probs_at(self, categories: torch.Tensor | None) -> torch.Tensor:
        """(B, num_vars, k) log-probabilities of ``categories`` (B, num_vars, k) int64 under
        each variable's input node: :attr:`node_log_probs` gathered at ``categories``,
        without building it (``-inf`` outside the variable's categories). None = every category."""
        if categories is None:
            return self.node_log_probs
        if not isinstance(categories, torch.Tensor) or categories.dtype != torch.int64 \
                or categories.dim() != 3 or categories.shape[:2] != self.node.shape:
            raise ValueError(f"categories: expected an int64 tensor of shape ({self.node.shape[0]}, "
                             f"{self.node.shape[1]}, k), got {getattr(categories, 'dtype', type(categories).__name__)} "
                             f"{tuple(getattr(categories, 'shape', ()))}")
        k = categories.shape[-1]
        return self._read(self.node.reshape(-1), categories.reshape(-1, k), None).view(categories.shape)

    def node_log_probs_of(self, draws: torch.Tensor, variables: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(A, num_cats) rows ``node_log_probs[draws[a], variables[a]]`` for int64 index
        vectors ``draws`` and ``variables`` (A,), without building the others; into ``out``
        ((A, num_cats), the circuit's dtype and device) when given."""
        batch, num_vars = self.node.shape
        for name, index, size in (("draws", draws, batch), ("variables", variables, num_vars)):
            if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
                raise ValueError(f"{name}: expected a 1-d int64 tensor, got {getattr(index, 'dtype', type(index).__name__)} "
                                 f"{tuple(getattr(index, 'shape', ()))}")
            if len(index) and not (0 <= int(index.min()) and int(index.max()) < size):
                raise ValueError(f"{name}: expected indices in [0, {size})")
        if draws.shape != variables.shape:
            raise ValueError(f"draws, variables: expected equal lengths, got {len(draws)} and {len(variables)}")
        width = max(self._circuit.num_cats, 1)
        if out is not None and (tuple(out.shape) != (len(draws), width) or out.dtype != self._circuit.dtype):
            raise ValueError(f"out: expected a {self._circuit.dtype} tensor of shape ({len(draws)}, {width}), "
                             f"got {out.dtype} {tuple(out.shape)}")
        return self._read(self.node[draws, variables], None, out)

    def _read(self, node: torch.Tensor, categories: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        if _input_versions(self._circuit) != self._versions:
            raise RuntimeError("node_log_probs: the circuit's input parameters changed since these samples were drawn; "
                               "read the node log-probabilities before updating the parameters")
        with torch.no_grad():
            return self._circuit.layer_sequence[0].node_log_probs(node, self._tables, self._circuit.num_cats,
                                                                  self._circuit.dtype, categories, out)


def _input_versions(circuit) -> list[tuple]:
    """The versions of the stored input banks (what the node log-probabilities are read from;
    whether inference mode is on does not matter)."""
    return [bank_stamp(circuit, key)[:-1] for key, bank in circuit.plan.banks.items() if bank.role == "input"]


class _InverseCDF(Chooser):
    """Exact draws by inverse CDF, one uniform per row from ``generator``."""

    def __init__(self, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device, runtime) -> None:
        self.generator, self.dtype, self.device, self.runtime = generator, dtype, device, runtime

    def uniforms(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self.generator, dtype=self.dtype, device=self.device)

    def pick(self, scores: torch.Tensor, uniforms: torch.Tensor | None, rows: torch.Tensor | None = None,
             linear: bool = False, addend: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return dispatch.inverse_cdf(scores, uniforms, backend=self.runtime.backend, record=self.runtime, rows=rows,
                                    linear=linear, overwrite=rows is None and addend is None,
                                    addend=None if addend is None else addend[0],
                                    addend_rows=None if addend is None else addend[1], uniforms_in_range=True)


def _rows(value: torch.Tensor | TopKEvidence | None) -> int | None:
    if isinstance(value, TopKEvidence):
        return value.values.shape[0] if isinstance(value.values, torch.Tensor) else None
    return value.shape[0] if isinstance(value, torch.Tensor) else None


def _batch(circuit, num_samples: int | None, x: torch.Tensor | None, missing: torch.Tensor | None,
           soft_evidence: torch.Tensor | TopKEvidence | None
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | TopKEvidence | None, int]:
    """The query inputs and the number of draws. Inputs have one row per draw, or a single
    row shared by every draw (unconditional sampling, or ``num_samples`` draws under one row
    of evidence): the bottom-up pass then runs on that row once."""
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    if x is None:
        if missing is not None:
            raise ValueError("missing: only meaningful together with x")
        batch = num_samples if num_samples is not None else _rows(soft_evidence)
        if batch is None:
            raise ValueError("num_samples: expected a positive int when x and soft_evidence are not given")
        dtype = circuit.dtype if circuit.has_continuous else torch.long
        rows = 1 if soft_evidence is None else batch
        x = torch.zeros(rows, circuit.num_vars, dtype=dtype, device=circuit.device)
        return x, torch.ones_like(x, dtype=torch.bool), soft_evidence, batch
    if num_samples is None or not isinstance(x, torch.Tensor) or x.shape[0] == num_samples:
        return x, missing, soft_evidence, x.shape[0] if isinstance(x, torch.Tensor) else 0
    if x.shape[0] != 1:
        raise ValueError(f"num_samples: x has {x.shape[0]} rows; expected num_samples equal to that or x with one row")
    if _rows(soft_evidence) in (None, 1) and _rows(missing) in (None, 1):  # one row shared by the draws
        return x, missing, soft_evidence, num_samples
    x = x.expand(num_samples, -1)
    missing = missing.expand(num_samples, -1) if isinstance(missing, torch.Tensor) else missing
    if isinstance(soft_evidence, TopKEvidence):
        soft_evidence = soft_evidence.expand(num_samples)
    elif isinstance(soft_evidence, torch.Tensor):
        soft_evidence = soft_evidence.expand(num_samples, -1, -1)
    return x, missing, soft_evidence, num_samples


@torch.no_grad()
def sample(circuit, num_samples: int | None = None, *, x: torch.Tensor | None = None,
           missing: torch.Tensor | None = None, soft_evidence: torch.Tensor | None = None,
           generator: torch.Generator | None = None, return_nodes: bool = False):
    """Exact samples of the weighted distribution of :func:`log_prob`, conditioned on the
    observed entries of ``x``.

    Args:
        num_samples: number of samples when ``x`` is omitted (all variables drawn), or to
            repeat a single-row ``x``. Draws that share one row of evidence (unconditional
            draws, or a single-row ``x`` with single-row ``missing`` and ``soft_evidence``)
            share one bottom-up pass: only the top-down pass runs per draw.
        x: (B, num_vars) values; entries with ``missing`` True are drawn, others kept.
        missing: (B, num_vars) bool; default nothing missing (then ``x`` comes back as is).
        soft_evidence: (B, num_vars, num_cats) log-weights multiplied into the distribution,
            or a :class:`~pclayer.TopKEvidence`.
        generator: torch generator for reproducible draws.
        return_nodes: also return the chosen input node per variable, with its
            log-probabilities on demand (a :class:`SampleResult`).

    Returns:
        (B, num_vars) samples, or a :class:`SampleResult` if ``return_nodes``.

    Raises:
        ZeroProbabilityError: for rows whose evidence has probability zero.
    """
    x, missing, soft_evidence, draws = _batch(circuit, num_samples, x, missing, soft_evidence)
    ev = prepare(circuit, x, missing, soft_evidence)
    tables = circuit.tables()
    values = circuit.evaluate(SCALED, ev.x, ev.missing, ev.soft_evidence, tables, keep=True)
    require_positive(values.root(circuit), "sample")
    device, dtype, runtime = circuit.device, circuit.dtype, circuit.runtime

    chooser = _InverseCDF(generator, dtype, device, runtime)

    def normals(count: int) -> torch.Tensor:
        return torch.randn(count, generator=generator, dtype=dtype, device=device)

    x_out, node = top_down(circuit, values, tables, ev.x, ev.missing, ev.soft_evidence, chooser, normals, draws=draws)
    x_out = torch.where(missing, x_out.to(x.dtype), x) if missing is not None else x.expand(draws, -1).clone()
    if return_nodes:
        return SampleResult(circuit, x_out, node, tables)
    return x_out
