"""Input (leaf) distributions of symbolic circuits.

Each distribution describes what one input node group computes for its variable and
holds no tensors itself: the parameters of a group live on the group. Discrete
distributions expose a log-probability table of shape (num_nodes, num_cats); the
compiler stacks the tables of all groups with the same shape into one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


class Distribution:
    """Base class of input distributions."""

    #: Number of categories of a discrete distribution, ``None`` for continuous ones.
    num_cats: int | None = None
    #: Whether the parameters are learned (Indicator tables are fixed).
    learnable: bool = True

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def init_params(self, num_nodes: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Random parameters for a group of ``num_nodes`` nodes."""
        raise NotImplementedError

    def check_params(self, params: dict[str, object], num_nodes: int) -> dict[str, torch.Tensor]:
        """Validate user parameters; returns float64 tensors keyed as in :meth:`init_params`."""
        raise NotImplementedError

    def log_table(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """(num_nodes, num_cats) log-probabilities of a discrete distribution."""
        raise NotImplementedError


@dataclass(frozen=True)
class Categorical(Distribution):
    """Categorical over ``num_cats`` values; parameter ``probs`` (num_nodes, num_cats)."""

    num_cats: int

    def __post_init__(self) -> None:
        if not isinstance(self.num_cats, int) or self.num_cats < 1:
            raise ValueError(f"num_cats: expected a positive int, got {self.num_cats!r}")

    def init_params(self, num_nodes, generator):
        return {"probs": random_probabilities((num_nodes, self.num_cats), generator)}

    def check_params(self, params, num_nodes):
        probs = _as_float_tensor(params["probs"], "params['probs']")
        return {"probs": _check_probability_rows(probs, "params['probs']", (num_nodes, self.num_cats))}

    def log_table(self, params):
        return torch.log(params["probs"])


@dataclass(frozen=True)
class Bernoulli(Distribution):
    """Bernoulli over {0, 1}; parameter ``p`` (num_nodes,), the probability of 1."""

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

    def log_table(self, params):
        p = params["p"]
        return torch.log(torch.stack([1 - p, p], dim=-1))


@dataclass(frozen=True)
class Indicator(Distribution):
    """Indicator of one value per node: node ``j`` puts all mass on ``values[j]``.

    ``values`` defaults to ``0, 1, ..., num_nodes - 1`` (then ``num_nodes`` must equal
    ``num_cats``). Indicators have no learnable parameters.
    """

    num_cats: int
    values: tuple[int, ...] | None = None
    learnable: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_cats, int) or self.num_cats < 1:
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

    def log_table(self, params):
        values = params["values"].long()
        table = torch.full((values.numel(), self.num_cats), -torch.inf, dtype=torch.float64)
        table[torch.arange(values.numel()), values] = 0.0
        return table


@dataclass(frozen=True)
class Gaussian(Distribution):
    """Univariate normal; parameters ``mean`` and ``std`` (num_nodes,)."""

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
