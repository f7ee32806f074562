"""Input (leaf) distributions: everything the compiler, the queries and EM need of a leaf.

A distribution describes what one input node group computes for its variable; the group
holds the parameters. Each distribution class owns its behaviour, in two families:

* **Tabular** (discrete, ``num_cats`` values): the engine needs only the normalised
  (banks, n, K) log-probability table :meth:`Distribution.log_table` computes from the stored
  parameter bank. Evidence, marginalisation, top-k evidence, sampling and MPE then work on
  the table; EM gets expected counts per table entry and :meth:`Distribution.m_step` maps
  them to new stored parameters.
* **Continuous** (``num_cats`` is None): the distribution gives log-densities, the value
  summed out, draws, modes and flow-weighted statistics for EM.

A compiled plan names each bucket's distribution by class name, found among the subclasses
of :class:`Distribution` (see :func:`distribution_for_bucket`), so a new distribution is one
class (see ``docs/architecture.md``). Stored banks hold G groups of parameters: ``(banks, ...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

def _as_float_tensor(value: object, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if torch.isnan(tensor).any():
        raise ValueError(f"{name}: expected no NaN, got {tensor.tolist()}")
    return tensor


def _check_probability_rows(probs: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(probs.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(probs.shape)}")
    if (probs < 0).any():
        raise ValueError(f"{name}: expected non-negative probabilities, got a minimum of {probs.min().item():.4g}")
    sums = probs.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        worst = (sums - 1).abs().argmax().item()
        raise ValueError(f"{name}: expected each row to sum to 1, row {worst} sums to {sums.flatten()[worst].item():.6g}")
    return probs


def random_probabilities(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Random rows on the simplex (last dimension sums to 1), bounded away from zero."""
    raw = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.05
    return raw / raw.sum(-1, keepdim=True)


def smoothed_table_update(old: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor | None,
                          step_size: float, pseudocount: float) -> torch.Tensor:
    """The M-step of rows normalised over the last dimension, in ``old``'s dtype.

    ``new = lerp(old, (counts + pseudocount / C) / (sum counts + pseudocount), step_size)``
    per row, with C the row's number of real entries (``mask``, default all); rows without
    flow and pseudocount keep ``old``. ``old`` (..., C) probabilities (may be overwritten),
    ``counts`` (..., C) expected counts (never written)."""
    flows = counts
    counts = counts.to(old.dtype)
    if mask is None:
        numerator = counts + pseudocount / counts.shape[-1] if pseudocount else counts
    else:
        size = mask.sum(-1, keepdim=True).to(counts.dtype)
        numerator = torch.where(mask, counts + pseudocount / size, torch.zeros_like(counts))
    total = numerator.sum(-1, keepdim=True)
    reached = total > 0
    if bool(reached.all()):  # the common case: no row keeps its parameters, so update in place
        target = numerator.div_(total) if numerator is not flows else numerator / total
        return target if step_size == 1 else old.lerp_(target, step_size)
    target = numerator / torch.where(reached, total, torch.ones_like(total))
    return torch.where(reached, torch.lerp(old, target, step_size), old)


class Distribution:
    """Base class of input distributions (see the module docstring for the two families)."""

    #: Number of values of a discrete distribution, ``None`` for continuous ones.
    num_cats: int | None = None
    #: Whether the parameters are learned (Indicator tables are fixed).
    learnable: bool = True
    #: Prefix of the parameter bank names (``{prefix}_{n}x{K}``).
    bank_prefix: ClassVar[str] = ""
    #: Number S of sufficient statistics per node (continuous distributions).
    num_statistics: ClassVar[int] = 0

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    @property
    def tabular(self) -> bool:
        """Whether the distribution is discrete (handled through its log-probability table)."""
        return self.num_cats is not None

    # --- symbolic side -------------------------------------------------------------------
    def init_params(self, num_nodes: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Random parameters for a group of ``num_nodes`` nodes (float64)."""
        raise NotImplementedError

    def check_params(self, params: dict[str, object], num_nodes: int) -> dict[str, torch.Tensor]:
        """Validate user parameters; returns float64 tensors keyed as in :meth:`init_params`."""
        raise NotImplementedError

    def signature(self) -> tuple:
        """What must agree for two groups to share (tie) parameters, besides the node count."""
        return (self.kind, self.num_cats)

    # --- compiled side -------------------------------------------------------------------
    def engine(self) -> Distribution:
        """The distribution whose behaviour runs this one's banks (e.g. Bernoulli runs as a
        two-value Categorical); itself by default."""
        return self

    def bank_key(self, num_nodes: int) -> str:
        """Name of the parameter bank that stacks groups of ``num_nodes`` nodes."""
        return f"{self.bank_prefix}_{num_nodes}x{self.num_cats or 0}"

    def to_bank(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """One group's stored (unconstrained) parameters, float64; stacked into a bank."""
        raise NotImplementedError

    @classmethod
    def from_bank(cls, num_cats: int) -> Distribution:
        """The distribution of a compiled bucket with ``num_cats`` values (plans store the
        class name and the value count only)."""
        raise NotImplementedError

    def num_free_parameters(self, bank: torch.Tensor) -> int:
        """Free parameters of a stored bank."""
        return bank.numel()

    # tabular family
    def table_shape(self, bank_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape (banks, n, K) of the table of a stored bank of shape ``bank_shape`` (banks, n, ...)."""
        return (*bank_shape[:2], self.num_cats)

    def log_table(self, bank: torch.Tensor) -> torch.Tensor:
        """(banks, n, K) normalised log-probabilities from the stored bank; differentiable.
        Row ``[b, j]`` depends on ``bank[b, j]`` only: evaluations normalise just the rows they
        read (:meth:`pclayer.tables.Tables.log_rows`)."""
        raise NotImplementedError

    def log_table_into(self, bank: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`log_table` written into ``out`` (a buffer of its shape; may be ``bank`` itself
        when the shapes agree); not differentiable."""
        return out.copy_(self.log_table(bank))

    def linear_table(self, bank: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(banks, n, K) probabilities from the stored bank, into ``out`` if given."""
        return torch.exp(self.log_table(bank), out=out)

    def m_step(self, bank: torch.Tensor, counts: torch.Tensor, step_size: float, pseudocount: float) -> torch.Tensor:
        """The damped M-step of :mod:`pclayer.learn.em` from expected counts (banks, n, K) of
        every table entry: writes the new stored parameters into ``bank`` in place and returns
        their (banks, n, K) probabilities. ``counts`` must not be written."""
        raise NotImplementedError

    # continuous family
    def log_density(self, bank: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, G, n) log-densities of values ``x`` (B, G) under the groups' bank rows (G, ...)."""
        raise NotImplementedError

    def log_mode_density(self, bank: torch.Tensor) -> torch.Tensor:
        """(G, n) log-density at each node's mode (the max-product value summed out)."""
        raise NotImplementedError

    def draw(self, rows: torch.Tensor, nodes: torch.Tensor, normals: torch.Tensor | None) -> torch.Tensor:
        """(A,) values of nodes ``nodes`` (A,) with bank rows ``rows`` (A, ...): draws from
        standard ``normals`` (A,), or the modes when ``normals`` is None."""
        raise NotImplementedError

    def statistics(self, bank: torch.Tensor, flow: torch.Tensor, x: torch.Tensor,
                   gone: torch.Tensor | None) -> torch.Tensor:
        """(G, S, n) flow-weighted sufficient statistics: ``flow`` (B, G, n) node flows,
        ``x`` (B, G) values, ``gone`` (B, G) missing entries (expectations used there)."""
        raise NotImplementedError

    def update_from_statistics(self, bank: torch.Tensor, stats: torch.Tensor, step_size: float,
                               pseudocount: float, min_std: float) -> torch.Tensor:
        """New stored bank from accumulated :meth:`statistics` (banks, S, n)."""
        raise NotImplementedError


def distribution_for_bucket(name: str, num_cats: int) -> Distribution:
    """The distribution of a compiled bucket (class ``name``, ``num_cats`` values): a
    subclass of :class:`Distribution` of that name, defined anywhere before the lookup."""
    known: dict[str, type[Distribution]] = {}
    pending = list(Distribution.__subclasses__())
    while pending:
        cls = pending.pop()
        known.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    if name not in known:
        raise ValueError(f"distribution: unknown input distribution {name!r}; known: {sorted(known)}")
    return known[name].from_bank(num_cats)


@dataclass(frozen=True)
class Categorical(Distribution):
    """Categorical over ``num_cats`` values; parameter ``probs`` (num_nodes, num_cats).

    Stored as unconstrained log-weights, normalised by a log-softmax on use."""

    num_cats: int
    bank_prefix: ClassVar[str] = "cat"

    def __post_init__(self) -> None:
        if isinstance(self.num_cats, bool) or not isinstance(self.num_cats, int) or self.num_cats < 1:
            raise ValueError(f"num_cats: expected a positive int, got {self.num_cats!r}")

    def init_params(self, num_nodes, generator):
        return {"probs": random_probabilities((num_nodes, self.num_cats), generator)}

    def check_params(self, params, num_nodes):
        probs = _as_float_tensor(params["probs"], "params['probs']")
        return {"probs": _check_probability_rows(probs, "params['probs']", (num_nodes, self.num_cats))}

    def to_bank(self, params):
        return torch.log(params["probs"])

    @classmethod
    def from_bank(cls, num_cats):
        return cls(num_cats)

    def num_free_parameters(self, bank):
        return bank.numel() - bank[..., 0].numel()

    def log_table(self, bank):
        return torch.log_softmax(bank, dim=-1)

    def log_table_into(self, bank, out):
        return torch._log_softmax(bank, -1, False, out=out)  # no temporary; elementwise per row, so out may be bank

    def linear_table(self, bank, out=None):
        return torch.softmax(bank, dim=-1, out=out)

    def m_step(self, bank, counts, step_size, pseudocount):
        new = smoothed_table_update(torch.softmax(bank, dim=-1), counts, None, step_size, pseudocount)
        torch.log(new, out=bank)
        return new


@dataclass(frozen=True)
class Bernoulli(Distribution):
    """Bernoulli over {0, 1}; parameter ``p`` (num_nodes,), the probability of 1.
    Runs as a two-value :class:`Categorical`."""

    num_cats: int = field(default=2, init=False)

    def init_params(self, num_nodes, generator):
        return {"p": torch.rand(num_nodes, generator=generator, dtype=torch.float64) * 0.9 + 0.05}

    def check_params(self, params, num_nodes):
        p = _as_float_tensor(params["p"], "params['p']")
        if tuple(p.shape) != (num_nodes,):
            raise ValueError(f"params['p']: expected shape ({num_nodes},), got {tuple(p.shape)}")
        if ((p < 0) | (p > 1)).any():
            raise ValueError(f"params['p']: expected probabilities in [0, 1], got range [{p.min().item()}, {p.max().item()}]")
        return {"p": p}

    def engine(self):
        return Categorical(2)

    def to_bank(self, params):
        p = params["p"]
        return torch.log(torch.stack([1 - p, p], dim=-1))


@dataclass(frozen=True)
class Indicator(Distribution):
    """Indicator of one value per node: node ``j`` puts all mass on ``values[j]``.

    ``values`` defaults to ``0, 1, ..., num_nodes - 1`` (then ``num_nodes`` must equal
    ``num_cats``). Indicators have no learnable parameters: the bank is the fixed log table.
    """

    num_cats: int
    values: tuple[int, ...] | None = None
    learnable: bool = field(default=False, init=False)
    bank_prefix: ClassVar[str] = "ind"

    def __post_init__(self) -> None:
        if isinstance(self.num_cats, bool) or not isinstance(self.num_cats, int) or self.num_cats < 1:
            raise ValueError(f"num_cats: expected a positive int, got {self.num_cats!r}")
        if self.values is not None:
            object.__setattr__(self, "values", tuple(int(v) for v in self.values))
            bad = [v for v in self.values if not 0 <= v < self.num_cats]
            if bad:
                raise ValueError(f"values: expected integers in [0, {self.num_cats}), got {bad}")

    def node_values(self, num_nodes: int) -> torch.Tensor:
        if self.values is None:
            if num_nodes != self.num_cats:
                raise ValueError(f"num_nodes: Indicator({self.num_cats}) without values needs num_nodes == {self.num_cats}, got {num_nodes}")
            return torch.arange(num_nodes)
        if len(self.values) != num_nodes:
            raise ValueError(f"values: expected {num_nodes} entries (one per node), got {len(self.values)}")
        return torch.tensor(self.values)

    def init_params(self, num_nodes, generator):
        return {"values": self.node_values(num_nodes).to(torch.float64)}

    def check_params(self, params, num_nodes):
        raise ValueError("params: Indicator has no parameters; pass values=... to Indicator instead")

    def signature(self):
        return (self.kind, self.num_cats, self.values)

    def to_bank(self, params):
        values = params["values"].long()
        table = torch.full((values.numel(), self.num_cats), -torch.inf, dtype=torch.float64)
        table[torch.arange(values.numel()), values] = 0.0
        return table

    @classmethod
    def from_bank(cls, num_cats):
        return cls(num_cats)

    def num_free_parameters(self, bank):
        return 0

    def log_table(self, bank):
        return bank


@dataclass(frozen=True)
class Binomial(Distribution):
    """Binomial over ``0..n`` (``n`` trials, ``n + 1`` values); parameter ``p`` (num_nodes,),
    the success probability. Image models use ``Binomial(255)`` for 8-bit pixels.

    Stored as the logit of ``p``; its table is
    ``log C(n, k) + k log p + (n - k) log(1 - p)``. EM sets ``p`` to the expected value of
    ``k / n`` under the node's flows (a pseudocount adds ``p = 1/2`` pseudo-observations)."""

    n: int
    num_cats: int = field(init=False)
    bank_prefix: ClassVar[str] = "binom"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n: expected a positive int number of trials, got {self.n!r}")
        object.__setattr__(self, "num_cats", self.n + 1)

    def init_params(self, num_nodes, generator):
        return {"p": torch.rand(num_nodes, generator=generator, dtype=torch.float64) * 0.8 + 0.1}

    def check_params(self, params, num_nodes):
        p = _as_float_tensor(params["p"], "params['p']")
        if tuple(p.shape) != (num_nodes,):
            raise ValueError(f"params['p']: expected shape ({num_nodes},), got {tuple(p.shape)}")
        if ((p <= 0) | (p >= 1)).any():
            raise ValueError(f"params['p']: expected probabilities in (0, 1), got range [{p.min().item()}, {p.max().item()}]")
        return {"p": p}

    def to_bank(self, params):
        return torch.logit(params["p"])

    @classmethod
    def from_bank(cls, num_cats):
        return cls(num_cats - 1)

    def _log_binomial_coefficients(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.arange(self.num_cats, dtype=like.dtype, device=like.device)
        n = float(self.n)
        coefficients = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        return k, coefficients

    def log_table(self, bank):
        k, coefficients = self._log_binomial_coefficients(bank)
        log_p, log_q = torch.nn.functional.logsigmoid(bank), torch.nn.functional.logsigmoid(-bank)
        return coefficients + k * log_p.unsqueeze(-1) + (self.n - k) * log_q.unsqueeze(-1)

    def m_step(self, bank, counts, step_size, pseudocount):
        k, _ = self._log_binomial_coefficients(counts)
        total = counts.sum(-1)
        mean = (counts * k).sum(-1) / self.n
        old = torch.sigmoid(bank.double())
        weight = total + pseudocount
        target = torch.where(weight > 0, (mean + 0.5 * pseudocount) / torch.where(weight > 0, weight, 1.0), old)
        p = torch.lerp(old, target, step_size).clamp(1e-12, 1 - 1e-12).to(bank.dtype)
        bank.copy_(torch.logit(p))
        return torch.exp(self.log_table(bank))


@dataclass(frozen=True)
class Gaussian(Distribution):
    """Univariate normal; parameters ``mean`` and ``std`` (num_nodes,). Stored as
    (2, n): mean and log standard deviation."""

    bank_prefix: ClassVar[str] = "gauss"
    num_statistics: ClassVar[int] = 3

    def init_params(self, num_nodes, generator):
        return {
            "mean": torch.randn(num_nodes, generator=generator, dtype=torch.float64),
            "std": torch.ones(num_nodes, dtype=torch.float64),
        }

    def check_params(self, params, num_nodes):
        out = {}
        for key in ("mean", "std"):
            value = _as_float_tensor(params[key], f"params[{key!r}]")
            if tuple(value.shape) != (num_nodes,):
                raise ValueError(f"params[{key!r}]: expected shape ({num_nodes},), got {tuple(value.shape)}")
            out[key] = value
        if (out["std"] <= 0).any():
            raise ValueError(f"params['std']: expected positive values, got a minimum of {out['std'].min().item():.4g}")
        return out

    def bank_key(self, num_nodes):
        return f"gauss_{num_nodes}"

    def to_bank(self, params):
        return torch.stack([params["mean"], torch.log(params["std"])])

    @classmethod
    def from_bank(cls, num_cats):
        return cls()

    def log_density(self, bank, x):
        mean, log_std = bank[:, 0], bank[:, 1]
        z = (x.unsqueeze(-1).to(mean.dtype) - mean) * torch.exp(-log_std)
        return -0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)

    def log_mode_density(self, bank):
        return -bank[:, 1] - 0.5 * math.log(2 * math.pi)

    def draw(self, rows, nodes, normals):
        picked = torch.arange(len(nodes), device=nodes.device)
        mean = rows[picked, 0, nodes]
        if normals is None:
            return mean
        return mean + torch.exp(rows[picked, 1, nodes]) * normals.to(mean.dtype)

    def statistics(self, bank, flow, x, gone):
        flow = flow.double()
        mean, variance = bank[:, 0].double(), torch.exp(2 * bank[:, 1].double())
        xg = x.double().unsqueeze(-1)
        first, second = xg.expand_as(flow), (xg * xg).expand_as(flow)
        if gone is not None:
            first = torch.where(gone.unsqueeze(-1), mean.unsqueeze(0), first)
            second = torch.where(gone.unsqueeze(-1), (mean * mean + variance).unsqueeze(0), second)
        return torch.stack([flow.sum(0), (flow * first).sum(0), (flow * second).sum(0)], dim=1)

    def update_from_statistics(self, bank, stats, step_size, pseudocount, min_std):
        mean, std = bank[:, 0].double(), torch.exp(bank[:, 1].double())
        second = mean * mean + std * std
        weight = stats[:, 0] + pseudocount
        first_sum = stats[:, 1] + pseudocount * mean
        second_sum = stats[:, 2] + pseudocount * second
        reached = weight > 0
        safe = torch.where(reached, weight, torch.ones_like(weight))
        target_mean = torch.where(reached, first_sum / safe, mean)
        target_second = torch.where(reached, second_sum / safe, second)
        new_mean = (1 - step_size) * mean + step_size * target_mean
        new_second = (1 - step_size) * second + step_size * target_second
        variance = (new_second - new_mean * new_mean).clamp(min=min_std * min_std)
        return torch.stack([new_mean, 0.5 * torch.log(variance)], dim=1).to(bank.dtype)
