"""``check_circuit``: a battery of correctness properties for any compiled circuit.

The circuit is exercised only through what a user calls: ``log_prob``, ``posterior``,
``sample`` and ``mpe`` (plus ``parameters()`` when it has them, for parameter flows) and the
attributes ``num_vars``, ``var_cats`` and ``num_cats``. Wrappers and subclasses of
:class:`pclayer.TensorCircuit` are therefore checked exactly as they behave. No property
enumerates more than ``max_enumeration`` joint assignments, so the battery runs on large
circuits; where the joint is that small, every property is also checked exhaustively.

Properties (the names used in the error report):

* ``normalisation``: the full marginal (every variable missing) is ``log 1 = 0``; with a
  small joint, the probabilities of all assignments sum to one.
* ``marginal_consistency``: ``p(x_A) = sum_b p(x_A, x_B = b)`` for random evidence and a
  random set B of one or two observed variables, through ``log_prob`` itself; with a small
  joint, marginals equal sums of the enumerated joint.
* ``soft_evidence``: for a missing variable ``i``, ``log_prob(x, m, w)`` is the log-sum-exp
  over values ``k`` of ``log_prob`` with ``x_i = k`` observed; for an observed one, removing
  ``w[i]`` subtracts ``w[i, x_i]``.
* ``posterior``: rows sum to one (zeros beyond a variable's categories, one-hot where
  observed) and equal ratios of marginals ``p(x_i = k, e) / p(e)``.
* ``mpe``: observed values are kept and the decoding has positive probability. With
  ``mpe="max_product"`` (pclayer's contract: the best joint assignment of missing values and
  latent choices) decoding again any single decoded variable, or a random subset of them,
  with the others fixed returns the same values. With ``mpe="exact"`` (the argmax of
  ``log_prob``) the decoding is at least as likely as random completions and as every
  single-variable change, and (small joint) as every completion.
* ``sampling``: three settings, each one ``circuit.sample(num_samples, ...)`` call under one
  row of evidence (as a user draws many samples for one query): unconditional, conditioned on
  evidence, and conditioned on evidence plus soft evidence. Their draws match one-variable
  marginals of 4 random missing variables and two-variable marginals of 2 pairs of them,
  computed with ``log_prob`` (Pearson chi-square on at most 8 value bins per variable, 4 x 4
  per pair; bins are sets of values selected by soft evidence of ``-inf`` outside them; with
  a small joint, the unconditional draws also match the whole joint); they keep the observed
  values, and the first 16 draws of each setting have positive probability. One more call
  draws once per row of a batch of different evidence rows (kept values, positive
  probability). All chi-square tests share the false-alarm rate ``alpha`` (Bonferroni), so a
  correct circuit fails this property with probability at most ``alpha`` (up to the
  chi-square approximation of Pearson's statistic, cells pooled to expected counts of at
  least 5; with a fixed ``seed`` the verdict never changes from run to run). The default
  ``num_samples`` is the fewest draws with which each test detects, with probability 0.99,
  a marginal off by total variation 0.25 over its cells; the report states the deviation
  detected at the number used.
* ``flows``: gradients of ``log_prob`` with respect to soft evidence, and to a few
  parameters when the circuit has ``parameters()``, equal central finite differences.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from pclayer.errors import ZeroProbabilityError

PROPERTIES = ("normalisation", "marginal_consistency", "soft_evidence", "posterior", "mpe", "sampling", "flows")
_MPE_MODES = ("max_product", "exact")
_BINS = 8  # value bins per variable in the one-variable chi-square tests
_PAIR_BINS = 4  # ... and per variable in the two-variable tests
_MIN_EXPECTED = 5.0  # smallest expected count of a chi-square cell (smaller ones are pooled)
_CHUNK = 256  # rows per query call
_TESTED_VARIABLES = 4  # missing variables per sampling setting with a one-variable test (paired for the two-variable tests)
_DEVIATION = 0.25  # total variation over a test's cells that the default num_samples detects ...
_POWER = 0.99  # ... with this probability
_POSSIBLE = 16  # samples per sampling setting whose probability is checked to be positive


@dataclass
class CheckReport:
    """What :func:`check_circuit` verified on a circuit that passed.

    Attributes:
        comparisons: number of comparisons (or chi-square tests) made per property.
        timings: wall-clock seconds per property.
        skipped: properties not run, with the reason.
        notes: per property, what was subsampled and what the tests can detect.
        seconds: wall-clock time of the whole check.
    """

    comparisons: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """One readable line per property (with its note)."""
        lines = [f"{name}: {count} comparisons passed in {self.timings.get(name, 0.0):.2f} s"
                 + (f" ({self.notes[name]})" if name in self.notes else "")
                 for name, count in self.comparisons.items()]
        lines += [f"{name}: skipped ({reason})" for name, reason in self.skipped.items()]
        return "\n".join(lines + [f"total time: {self.seconds:.2f} s"])


def _fmt(values: np.ndarray, limit: int = 16) -> str:
    flat = np.asarray(values).tolist()
    if len(flat) <= limit:
        return str(flat)
    return str(flat[:limit])[:-1] + f", ... ({len(flat)} entries)]"


def _lse(values: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(values, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(np.sum(np.exp(values - shift), axis=axis, keepdims=True)) + shift, axis=axis)


def _chi2_pvalue(statistic: float, dof: int) -> float:
    """Upper tail of the chi-square distribution with ``dof`` degrees of freedom."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def _chi2_quantile(level: float, dof: int) -> float:
    """The statistic whose upper-tail probability is ``level`` (bisection)."""
    low, high = 0.0, float(dof) + 10.0
    while _chi2_pvalue(high, dof) > level:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _chi2_pvalue(middle, dof) > level else (low, middle)
    return high


def _detection_probability(samples: int, deviation: float, level: float, dof: int) -> float:
    """Probability that a Pearson test with ``dof`` degrees of freedom at ``level`` rejects
    when the sampled cell probabilities differ from the expected ones by total variation
    ``deviation``: the statistic is then about noncentral chi-square with noncentrality
    ``samples * chi2-divergence >= samples * 4 * deviation**2`` (a Poisson mixture of central
    chi-square tails)."""
    half = 2.0 * samples * deviation ** 2  # noncentrality / 2
    terms = torch.arange(int(half + 12 * math.sqrt(half) + 40), dtype=torch.float64)
    weights = torch.exp(terms * math.log(half) - half - torch.lgamma(terms + 1)) if half > 0 else (terms == 0).double()
    critical = torch.tensor(_chi2_quantile(level, dof) / 2, dtype=torch.float64)
    return float((weights * torch.special.gammaincc(dof / 2 + terms, critical)).sum())


def _samples_for(deviation: float, level: float, dof: int) -> int:
    """Fewest samples with which such a test detects ``deviation`` with probability :data:`_POWER`."""
    low, high = 1, 16
    while _detection_probability(high, deviation, level, dof) < _POWER:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _detection_probability(middle, deviation, level, dof) < _POWER else (low, middle)
    return high


def _detectable_deviation(samples: int, level: float, dof: int) -> float:
    """Smallest total variation detected with probability :data:`_POWER` from ``samples``."""
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if _detection_probability(samples, middle, level, dof) < _POWER else (low, middle)
    return high


class _Checker:
    """Runs the properties of :func:`check_circuit` and collects violations."""

    def __init__(self, circuit: object, seed: int, rows: int, num_samples: int | None, alpha: float, mpe: str,
                 max_enumeration: int):
        self.circuit = circuit
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.rows = rows
        self.num_samples = num_samples
        self.alpha = alpha
        self.mpe_mode = mpe
        self.max_enumeration = max_enumeration
        self.var_cats = np.array([int(k) for k in circuit.var_cats], dtype=np.int64)
        self.num_vars = int(circuit.num_vars)
        self.num_cats = int(circuit.num_cats)
        self.device = getattr(circuit, "device", torch.device("cpu"))
        self.violations: list[tuple[str, str]] = []
        self.report = CheckReport()
        with torch.no_grad():
            probe = circuit.log_prob(torch.zeros(1, self.num_vars, dtype=torch.long, device=self.device),
                                     torch.ones(1, self.num_vars, dtype=torch.bool, device=self.device))
        self.dtype = probe.dtype
        self.eps = torch.finfo(self.dtype).eps
        # log-values are compared with tolerance atol + rtol * |value|
        self.rtol, self.atol = (1e-9, 1e-9) if self.dtype == torch.float64 else (2e-4, 2e-3)
        joint = math.prod(int(k) for k in self.var_cats)
        self.small = joint <= max_enumeration
        self.assignments = None
        if self.small:
            grids = np.meshgrid(*[np.arange(k) for k in self.var_cats], indexing="ij")
            self.assignments = np.stack([g.ravel() for g in grids], axis=1).astype(np.int64)
            self.joint = self.log_prob(self.assignments)
        x, missing, weights, self.evidence_values = self.evidence_rows(rows)
        self.evidence = (x, missing, weights)
        # up to two missing variables per evidence row, clamped to each value by the soft
        # evidence and posterior properties (the same log_prob rows serve both)
        self.picks = [[int(i) for i in self.rng.permutation(np.nonzero(m)[0])[:2]] for m in missing]
        self._clamped: dict[tuple[int, int], np.ndarray] = {}

    # ---------------------------------------------------------------- helpers

    def fail(self, name: str, message: str) -> None:
        self.violations.append((name, message))

    def count(self, name: str, n: int = 1) -> None:
        self.report.comparisons[name] = self.report.comparisons.get(name, 0) + n

    def _tensors(self, x, missing, soft):
        xt = torch.as_tensor(np.asarray(x), dtype=torch.long, device=self.device)
        mt = None if missing is None else torch.as_tensor(np.asarray(missing), dtype=torch.bool, device=self.device)
        wt = None if soft is None else torch.as_tensor(np.asarray(soft), dtype=self.dtype, device=self.device)
        return xt, mt, wt

    def log_prob(self, x: np.ndarray, missing: np.ndarray | None = None, soft: np.ndarray | None = None) -> np.ndarray:
        """(B,) float64 log_prob of the circuit, in chunks, without gradients."""
        out = []
        with torch.no_grad():
            for start in range(0, len(x), _CHUNK):
                part = slice(start, start + _CHUNK)
                args = self._tensors(x[part], None if missing is None else missing[part], None if soft is None else soft[part])
                out.append(self.circuit.log_prob(*args).detach().cpu().double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def close(self, a: np.ndarray, b: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Elementwise agreement of log-values (equal infinities agree)."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        scale = np.maximum(np.abs(a), np.abs(b)) if scale is None else scale
        with np.errstate(invalid="ignore"):
            return (a == b) | (np.abs(a - b) <= self.atol + self.rtol * np.where(np.isfinite(scale), scale, 0.0))

    def describe(self, x: np.ndarray, missing: np.ndarray, soft: np.ndarray | None) -> str:
        text = f"x={_fmt(x)}, missing={_fmt(np.nonzero(missing)[0])} (missing variables)"
        if soft is not None:
            text += f", soft_evidence with row norms {_fmt(np.round(np.abs(np.where(np.isfinite(soft), soft, 0)).sum(-1), 3))}"
        return text

    def random_x(self, count: int) -> np.ndarray:
        return (self.rng.random((count, self.num_vars)) * self.var_cats[None]).astype(np.int64)

    def evidence_rows(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``count`` rows of evidence of positive probability: random values with about half
        the variables missing (samples of the circuit where random values are impossible) and
        soft evidence; returns ``x`` (B, V), ``missing`` (B, V), ``weights`` (B, V, K) and
        their ``log_prob`` (B,)."""
        x = self.random_x(count)
        missing = self.rng.random((count, self.num_vars)) < 0.5
        weights = self.rng.normal(size=(count, self.num_vars, self.num_cats))
        values = self.log_prob(x, missing, weights)
        impossible = ~np.isfinite(values)
        for _ in range(3):
            if not impossible.any():
                break
            n = int(impossible.sum())
            x[impossible] = self.random_x(n)
            missing[impossible] = self.rng.random((n, self.num_vars)) < 0.8
            values = self.log_prob(x, missing, weights)
            impossible = ~np.isfinite(values)
        if impossible.any():  # sparse support: observe values the circuit itself draws
            try:
                with torch.no_grad():
                    drawn = self.circuit.sample(int(impossible.sum()),
                                                generator=torch.Generator(device=self.device).manual_seed(self.seed))
                x[impossible] = drawn.cpu().numpy().astype(np.int64)
            except ZeroProbabilityError:
                pass
            weights[impossible] = 0.0
            values = self.log_prob(x, missing, weights)
            impossible = ~np.isfinite(values)
        keep = ~impossible
        return x[keep], missing[keep], weights[keep], values[keep]

    def clamped(self, pairs: list[tuple[int, int]]) -> list[np.ndarray]:
        """(k,) log_prob of evidence row ``b`` with its missing variable ``i`` observed at each
        of its k values, per pair ``(b, i)``: one call for the pairs not computed before."""
        x, missing, weights = self.evidence
        todo = [pair for pair in dict.fromkeys(pairs) if pair not in self._clamped]
        for pair, values in zip(todo, self.batched([self.clamp(x[b], missing[b], weights[b], i) for b, i in todo])):
            self._clamped[pair] = values
        return [self._clamped[pair] for pair in pairs]

    def batched(self, parts: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]) -> list[np.ndarray]:
        """log_prob of several groups of rows in one call (soft evidence 0 where a group has none)."""
        if not parts:
            return []
        sizes = [len(x) for x, _, _ in parts]
        x = np.concatenate([x for x, _, _ in parts])
        missing = np.concatenate([np.zeros_like(x_, dtype=bool) if m is None else m for x_, m, _ in parts])
        soft = None
        if any(w is not None for _, _, w in parts):
            soft = np.concatenate([np.zeros((len(x_), self.num_vars, self.num_cats)) if w is None else w
                                   for x_, _, w in parts])
        values = self.log_prob(x, missing, soft)
        return np.split(values, np.cumsum(sizes)[:-1])

    def clamp(self, x: np.ndarray, missing: np.ndarray, weights: np.ndarray | None, var: int):
        """Rows of ``x`` with missing variable ``var`` observed at each of its values."""
        k = int(self.var_cats[var])
        rows = np.repeat(x[None], k, 0)
        rows[:, var] = np.arange(k)
        masks = np.repeat(missing[None], k, 0)
        masks[:, var] = False
        return rows, masks, None if weights is None else np.repeat(weights[None], k, 0)

    # ---------------------------------------------------------------- properties

    def normalisation(self) -> None:
        name = "normalisation"
        x = self.random_x(2)
        value = self.log_prob(x, np.ones_like(x, dtype=bool))
        bad = ~self.close(value, np.zeros(2), scale=np.zeros(2))
        self.count(name, 2)
        for b in np.nonzero(bad)[0]:
            self.fail(name, f"log_prob with every variable missing is {value[b]:.6g}, expected 0 (x={_fmt(x[b])})")
        if self.small:
            total = float(_lse(self.joint))
            self.count(name)
            if not self.close(total, 0.0, scale=np.array(0.0)):
                self.fail(name, f"the probabilities of all {len(self.joint)} assignments sum to exp({total:.6g}), expected 1")

    def marginal_consistency(self) -> None:
        name = "marginal_consistency"
        x, missing, weights = self.evidence
        parts, owners = [], []
        for b in range(len(x)):
            observed = np.nonzero(~missing[b])[0]
            if len(observed) == 0:
                continue
            size = 2 if len(observed) > 1 and self.rng.random() < 0.5 else 1
            chosen = self.rng.choice(observed, size=size, replace=False)
            if math.prod(int(self.var_cats[v]) for v in chosen) > 64:
                chosen = chosen[:1]
            values = np.stack(np.meshgrid(*[np.arange(self.var_cats[v]) for v in chosen], indexing="ij"), -1).reshape(-1, len(chosen))
            rows = np.repeat(x[b:b + 1], len(values), 0)
            rows[:, chosen] = values
            wider = missing[b].copy()
            wider[chosen] = True
            parts += [(x[b:b + 1], wider[None], None), (rows, np.repeat(missing[b:b + 1], len(values), 0), None)]
            owners.append((b, chosen, wider))
        if self.small:
            parts += [(x, missing, None), (x, missing, weights)]
        values = self.batched(parts)
        self.report.notes[name] = (f"{len(owners)} evidence rows, each with a random set B of 1 or 2 observed variables "
                                   f"(at most 64 joint values) summed out" + ("; every evidence row against the enumerated "
                                                                             "joint" if self.small else ""))
        for index, (b, chosen, wider) in enumerate(owners):
            lhs, rhs = float(values[2 * index][0]), float(_lse(values[2 * index + 1]))
            self.count(name)
            if not self.close(lhs, rhs):
                self.fail(name, f"log p(x_A) = {lhs:.8g} but log sum over x_B of p(x_A, x_B) = {rhs:.8g} "
                                f"for B = variables {chosen.tolist()} at {self.describe(x[b], wider, None)}")
        if self.small:
            for value, soft in ((values[-2], None), (values[-1], weights)):
                for b in range(len(x)):
                    row_soft = None if soft is None else soft[b]
                    expected = float(_lse(self.weighted_joint(x[b], missing[b], row_soft)))
                    self.count(name)
                    if not self.close(value[b], expected):
                        self.fail(name, f"log_prob = {value[b]:.8g} but the enumerated joint gives {expected:.8g} at "
                                        f"{self.describe(x[b], missing[b], row_soft)}")

    def weighted_joint(self, x: np.ndarray, missing: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        """(A,) log p(a) + sum_i w[i, a_i] over enumerated assignments, -inf where a disagrees
        with the observed entries of x."""
        consistent = np.all((self.assignments == x[None]) | missing[None], axis=1)
        values = self.joint.copy()
        if weights is not None:
            values = values + weights[np.arange(self.num_vars)[None], self.assignments].sum(1)
        return np.where(consistent, values, -np.inf)

    def soft_evidence(self) -> None:
        name = "soft_evidence"
        x, missing, weights = self.evidence
        base = self.evidence_values
        absent = [(b, picks[0]) for b, picks in enumerate(self.picks) if picks]
        self.report.notes[name] = f"one random missing and one random observed variable in each of {len(x)} evidence rows"
        for (b, i), values in zip(absent, self.clamped(absent)):
            expected = float(_lse(values))
            self.count(name)
            if not self.close(base[b], expected):
                self.fail(name, f"log_prob = {base[b]:.8g} but the log-sum-exp over the {self.var_cats[i]} values of "
                                f"missing variable {i} gives {expected:.8g} at {self.describe(x[b], missing[b], weights[b])}")
        present, parts = [], []
        for b in range(len(x)):
            observed = np.nonzero(~missing[b])[0]
            if len(observed):
                i = int(self.rng.choice(observed))
                without = weights[b:b + 1].copy()
                without[0, i] = 0.0
                present.append((b, i))
                parts.append((x[b:b + 1], missing[b:b + 1], without))
        for (b, i), values in zip(present, self.batched(parts)):
            reduced = float(values[0])
            expected = reduced + weights[b, i, x[b, i]]
            self.count(name)
            if not self.close(base[b], expected):
                self.fail(name, f"log_prob = {base[b]:.8g} but without the soft evidence of observed variable {i} it is "
                                f"{reduced:.8g}, which plus w[{i}, {x[b, i]}] = {weights[b, i, x[b, i]]:.6g} gives "
                                f"{expected:.8g}, at {self.describe(x[b], missing[b], weights[b])}")

    def posterior(self) -> None:
        name = "posterior"
        x, missing, weights = self.evidence
        with torch.no_grad():
            post = self.circuit.posterior(*self._tensors(x, missing, weights)).detach().cpu().double().numpy()
        if post.shape != (len(x), self.num_vars, self.num_cats):
            self.fail(name, f"posterior returned shape {post.shape}, expected {(len(x), self.num_vars, self.num_cats)}")
            return
        tol = 1e-9 if self.dtype == torch.float64 else 1e-4
        cats = np.arange(self.num_cats)[None, :] < self.var_cats[:, None]  # (V, K)
        ratios = [(b, i) for b, picks in enumerate(self.picks) for i in picks]
        base = self.evidence_values
        self.report.notes[name] = (f"every variable's row on {len(x)} evidence rows; ratios of marginals for up to 2 random "
                                   f"missing variables per row" + ("; every row against the enumerated joint" if self.small else ""))
        for b in range(len(x)):
            where = self.describe(x[b], missing[b], weights[b])
            sums = post[b].sum(-1)
            wrong = np.nonzero((np.abs(sums - 1) > tol * self.num_cats) | np.any(post[b] < -tol, -1)
                               | np.any(np.abs(np.where(cats, 0.0, post[b])) > tol, -1))[0]
            self.count(name)
            for i in wrong[:3]:
                self.fail(name, f"posterior row of variable {i} is {_fmt(np.round(post[b, i], 6))} (sum {sums[i]:.8g}), "
                                f"expected non-negative values summing to 1 over its {self.var_cats[i]} categories at {where}")
            present = np.nonzero(~missing[b])[0]
            if len(present):
                off = np.abs(post[b, present] - np.eye(self.num_cats)[x[b, present]]).max(-1) > tol
                for i in present[off][:3]:
                    self.fail(name, f"posterior of observed variable {i} = {x[b, i]} is {_fmt(np.round(post[b, i], 6))}, "
                                    f"expected one-hot at {where}")
            if self.small:
                joint = self.weighted_joint(x[b], missing[b], weights[b])
                probs = np.exp(joint - _lse(joint))
                expected = np.zeros((self.num_vars, self.num_cats))
                for v in range(self.num_vars):
                    np.add.at(expected[v], self.assignments[:, v], probs)
                self.count(name)
                if np.abs(expected - post[b]).max() > tol + 10 * self.rtol:
                    v = int(np.abs(expected - post[b]).max(-1).argmax())
                    self.fail(name, f"posterior of variable {v} is {_fmt(np.round(post[b, v], 6))} but the enumerated "
                                    f"joint gives {_fmt(np.round(expected[v], 6))} at {where}")
        for (b, i), values in zip(ratios, self.clamped(ratios)):
            k = int(self.var_cats[i])
            ratio = np.exp(values - base[b])
            self.count(name)
            if np.abs(ratio - post[b, i, :k]).max() > tol + 10 * self.rtol:
                self.fail(name, f"posterior of missing variable {i} is {_fmt(np.round(post[b, i, :k], 6))} but the "
                                f"ratios p(x_{i} = k, e) / p(e) are {_fmt(np.round(ratio, 6))} at "
                                f"{self.describe(x[b], missing[b], weights[b])}")

    def decode(self, x, missing, weights) -> np.ndarray:
        with torch.no_grad():
            out = self.circuit.mpe(*self._tensors(x, missing, weights))
        return out.detach().cpu().numpy().astype(np.int64)

    def mpe(self) -> None:
        name = "mpe"
        x, missing, weights = self.evidence
        decoded = self.decode(x, missing, weights)
        if decoded.shape != x.shape:
            self.fail(name, f"mpe returned shape {decoded.shape}, expected {x.shape}")
            return
        value = self.log_prob(decoded, np.zeros_like(missing), weights)
        for b in range(len(x)):
            where = self.describe(x[b], missing[b], weights[b])
            self.count(name, 2)
            changed = np.nonzero((decoded[b] != x[b]) & ~missing[b])[0]
            if len(changed):
                self.fail(name, f"mpe changed observed variables {changed[:10].tolist()} at {where}")
            if not np.isfinite(value[b]):
                self.fail(name, f"mpe decoded {_fmt(decoded[b])}, an assignment of probability zero, at {where}")
        if self.mpe_mode == "max_product":
            self.mpe_redecoding(x, missing, weights, decoded, value)
        else:
            self.mpe_exact(x, missing, weights, decoded, value)

    def mpe_redecoding(self, x, missing, weights, decoded, value) -> None:
        """Max-product decodings are stable: with every other variable fixed at the decoded
        values, decoding one variable (or a random subset) again gives the same values."""
        name = "mpe"
        rows, masks, owners = [], [], []
        for b in range(len(x)):
            absent = np.nonzero(missing[b])[0]
            picks = [np.array([i]) for i in self.rng.permutation(absent)[:2]]
            if len(absent) > 2:
                picks.append(absent[self.rng.random(len(absent)) < 0.5])
            for subset in picks:
                if len(subset) == 0:
                    continue
                mask = np.zeros(self.num_vars, dtype=bool)
                mask[subset] = True
                rows.append(decoded[b])
                masks.append(mask)
                owners.append(b)
        self.report.notes["mpe"] = (f"{len(x)} evidence rows; per row, 2 random decoded variables alone and a random half "
                                    f"of them decoded again")
        if not rows:
            return
        rows, masks, owners = np.stack(rows), np.stack(masks), np.array(owners)
        again = self.decode(rows, masks, weights[owners])
        differ = np.any(again != rows, axis=1)
        if differ.any():  # an equal weighted log_prob means a tie between two optimal decodings
            tied = self.close(self.log_prob(again, np.zeros_like(masks), weights[owners]), value[owners])
            differ &= ~tied
        self.count(name, len(rows))
        for r in np.nonzero(differ)[0]:
            b, variables = owners[r], np.nonzero(masks[r] & (again[r] != rows[r]))[0]
            self.fail(name, f"mpe decoded {_fmt(decoded[b])}, but decoding variables {np.nonzero(masks[r])[0].tolist()[:10]} "
                            f"again with the others fixed changes variables {variables[:10].tolist()} to "
                            f"{again[r, variables][:10].tolist()} at {self.describe(x[b], missing[b], weights[b])}")

    def mpe_exact(self, x, missing, weights, decoded, value) -> None:
        """Exact MPE: no random completion and no single-variable change is more likely."""
        name = "mpe"
        parts, owners = [], []
        for b in range(len(x)):
            absent = np.nonzero(missing[b])[0]
            if not len(absent):
                continue
            candidates = np.repeat(decoded[b:b + 1], 16, 0)
            candidates[:, absent] = self.random_x(16)[:, absent]
            changes = []
            for i in absent[:64]:
                for k in range(int(self.var_cats[i])):
                    if k != decoded[b, i]:
                        row = decoded[b].copy()
                        row[i] = k
                        changes.append(row)
            if changes:
                candidates = np.concatenate([candidates, np.stack(changes)])
            if self.small:
                consistent = np.all((self.assignments == x[b][None]) | missing[b][None], axis=1)
                candidates = np.concatenate([candidates, self.assignments[consistent]])
            parts.append((candidates, None, np.repeat(weights[b:b + 1], len(candidates), 0)))
            owners.append(b)
        self.report.notes["mpe"] = (f"{len(x)} evidence rows; per row, 16 random completions and every single-variable change "
                                    f"of up to 64 missing variables" + ("; every completion (enumerated)" if self.small else ""))
        for (candidates, _, _), scores, b in zip(parts, self.batched(parts), owners):
            self.count(name, len(candidates))
            better = scores > value[b] + self.atol + self.rtol * abs(value[b])
            if better.any():
                best = int(np.argmax(scores))
                self.fail(name, f"mpe decoded {_fmt(decoded[b])} with log_prob {value[b]:.8g}, but "
                                f"{_fmt(candidates[best])} has log_prob {scores[best]:.8g}, at "
                                f"{self.describe(x[b], missing[b], weights[b])}")

    # ---------------------------------------------------------------- sampling

    def bins(self, log_marginal: np.ndarray, count: int) -> list[np.ndarray]:
        """Value sets: the ``count - 1`` most probable values alone, the rest pooled."""
        order = np.argsort(-log_marginal, kind="stable")
        if len(order) <= count:
            return [order[i:i + 1] for i in range(len(order))]
        return [order[i:i + 1] for i in range(count - 1)] + [np.sort(order[count - 1:])]

    def masked(self, weights: np.ndarray, var: int, values: np.ndarray) -> np.ndarray:
        """``weights`` with every value of ``var`` outside ``values`` excluded (-inf)."""
        out = weights.copy()
        keep = np.zeros(self.num_cats, dtype=bool)
        keep[values] = True
        out[var, ~keep] = -np.inf
        return out

    def draw(self, name: str, label: str, count: int | None, x: np.ndarray, missing: np.ndarray,
             weights: np.ndarray | None, generator: torch.Generator) -> np.ndarray | None:
        """(count or B, V) draws of ``circuit.sample`` called as a user calls it: ``count``
        draws under one row of evidence (``x``, ``missing`` (1, V), ``weights`` (1, V, K) or
        None; a row with every variable missing and no weights is ``sample(count)``), or
        one draw per row of ``x`` (B, V) when ``count`` is None. None after reporting a failure."""
        xt, mt, wt = self._tensors(x, missing, weights)
        if count is not None and missing.all() and weights is None:
            call, args = "sample(num_samples)", {}
        else:
            call, args = "sample(x=...)", {"x": xt, "missing": mt, "soft_evidence": wt}
        try:
            with torch.no_grad():
                drawn = self.circuit.sample(count, **args, generator=generator)
        except ZeroProbabilityError as err:
            self.fail(name, f"{call} raised {err} on evidence of positive probability ({label} sampling)")
            return None
        samples = drawn.detach().cpu().numpy().astype(np.int64)
        expected = (len(x) if count is None else count, self.num_vars)
        if samples.shape != expected:
            self.fail(name, f"{call} returned shape {samples.shape}, expected {expected} ({label} sampling)")
            return None
        return samples

    def sampling(self) -> None:
        name = "sampling"
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        zeros = np.zeros((self.num_vars, self.num_cats))
        settings = [(np.zeros(self.num_vars, dtype=np.int64), np.ones(self.num_vars, dtype=bool), zeros, "unconditional")]
        x, missing, weights = self.evidence
        chosen = [b for b in range(len(x)) if missing[b].any() and (~missing[b]).any()]
        if chosen:
            b = chosen[0]
            settings.append((x[b], missing[b], zeros, "conditional"))
            settings.append((x[b], missing[b], self.rng.normal(size=zeros.shape) * 1.5, "conditional with soft evidence"))
        # at most this many chi-square tests share alpha; the one- and two-variable tests have at most 16 cells
        planned = len(settings) * (_TESTED_VARIABLES + _TESTED_VARIABLES // 2) + int(self.small)
        dof = _PAIR_BINS ** 2 - 1
        n = self.num_samples if self.num_samples is not None else _samples_for(_DEVIATION, self.alpha / planned, dof)
        self.report.notes[name] = (
            f"{n} draws in each of {len(settings)} settings ({', '.join(s[3] for s in settings)}) and one draw per "
            f"evidence row; per setting, one-variable tests of {_TESTED_VARIABLES} random missing variables and "
            f"two-variable tests of {_TESTED_VARIABLES // 2} pairs of them; at false-alarm rate {self.alpha:g} over "
            f"at most {planned} tests, a tested marginal off by total variation "
            f"{_detectable_deviation(n, self.alpha / planned, dof):.3g} over its cells is detected with probability "
            f"{_POWER:g} (noncentral chi-square approximation)")
        blocks = []
        for xe, me, we, label in settings:
            soft = we[None] if label.endswith("evidence") else None
            block = self.draw(name, label, n, xe[None], me[None], soft, generator)
            if block is None:
                return
            blocks.append(block)
        batch = self.draw(name, "one draw per evidence row", None, x, missing, weights, generator)
        if batch is None:  # reported; the settings are still tested
            x, missing, weights = x[:0], missing[:0], weights[:0]
            batch = x
        parts, plans = [(batch, None, weights)], []
        kept = np.all((batch == x) | missing, axis=1)
        self.count(name)
        if not kept.all():
            b = int(np.argmin(kept))
            self.fail(name, f"sample(x=...) with one draw per evidence row drew {_fmt(batch[b])}: it changed observed "
                            f"values of row {b}, {self.describe(x[b], missing[b], weights[b])}")
        for block, (xe, me, we, label) in zip(blocks, settings):
            where = f"{label} sampling at {self.describe(xe, me, we if label.endswith('evidence') else None)}"
            kept = np.all(block[:, ~me] == xe[~me][None], axis=1)
            self.count(name)
            if not kept.all():
                first = int(np.argmin(kept))
                self.fail(name, f"sample {first} is {_fmt(block[first])}: it changed observed values, {where}")
                continue
            check = block[:_POSSIBLE]
            variables = self.rng.permutation(np.nonzero(me)[0])[:_TESTED_VARIABLES]
            plan = {"block": block, "where": where, "setting": (xe, me, we), "variables": variables,
                    "possible": len(parts), "base": len(parts) + 1, "single": len(parts) + 2}
            parts.append((check, None, np.repeat(we[None], len(check), 0)))
            parts.append((xe[None], me[None], we[None]))
            rows = [self.masked(we, v, np.array([c])) for v in variables for c in range(int(self.var_cats[v]))]
            parts.append((np.repeat(xe[None], len(rows), 0), np.repeat(me[None], len(rows), 0),
                          np.stack(rows) if rows else np.zeros((0, self.num_vars, self.num_cats))))
            plans.append(plan)
        values = self.batched(parts)
        possible = np.isfinite(values[0])
        self.count(name)
        if not possible.all():
            b = int(np.argmin(possible))
            self.fail(name, f"sample(x=...) with one draw per evidence row drew {_fmt(batch[b])}, of probability zero, "
                            f"at {self.describe(x[b], missing[b], weights[b])}")
        tests, pair_parts, pair_plans = [], [], []
        for plan in plans:
            block, where, (xe, me, we) = plan["block"], plan["where"], plan["setting"]
            possible = np.isfinite(values[plan["possible"]])
            self.count(name)
            if not possible.all():
                self.fail(name, f"sample {_fmt(block[int(np.argmin(possible))])} has probability zero, {where}")
                continue
            base = float(values[plan["base"]][0])
            single = values[plan["single"]] - base
            start, pair_bins = 0, {}
            for v in plan["variables"]:
                k = int(self.var_cats[v])
                marginal = single[start:start + k]
                start += k
                pair_bins[v] = self.bins(marginal, _PAIR_BINS)
                bins = self.bins(marginal, _BINS)
                expected = np.array([np.exp(marginal[values_]).sum() for values_ in bins])
                observed = np.array([np.isin(block[:, v], values_).sum() for values_ in bins])
                tests.extend(self.chi_square(observed, expected, f"variable {v}, {where}"))
            variables = plan["variables"]
            for u, v in [(variables[i], variables[i + 1]) for i in range(0, len(variables) - 1, 2)]:
                cells = [(a, c) for a in pair_bins[u] for c in pair_bins[v]]
                rows = np.stack([self.masked(self.masked(we, u, a), v, c) for a, c in cells])
                pair_parts.append((np.repeat(xe[None], len(rows), 0), np.repeat(me[None], len(rows), 0), rows))
                pair_plans.append((block, where, u, v, cells, base))
            if self.small and where.startswith("unconditional"):
                index = np.ravel_multi_index(tuple(block.T), tuple(self.var_cats))
                observed = np.bincount(index, minlength=len(self.joint))
                tests.extend(self.chi_square(observed, np.exp(self.joint), f"the whole joint, {where}"))
        for (block, where, u, v, cells, base), log_pair in zip(pair_plans, self.batched(pair_parts)):
            observed = np.array([(np.isin(block[:, u], a) & np.isin(block[:, v], c)).sum() for a, c in cells])
            tests.extend(self.chi_square(observed, np.exp(log_pair - base), f"variables ({u}, {v}), {where}"))
        if not tests:
            return
        level = self.alpha / len(tests)
        for statistic, dof, description in tests:
            p_value = _chi2_pvalue(statistic, dof)
            self.count(name)
            if p_value < level:
                self.fail(name, f"chi-square p-value {p_value:.3g} < {level:.3g} (false-alarm rate {self.alpha:g} over "
                                f"{len(tests)} tests): {description}")

    def chi_square(self, observed: np.ndarray, probs: np.ndarray, description: str) -> list[tuple[float, int, str]]:
        """Pearson statistic of counts against probabilities (cells with expected counts
        below 5 are pooled); counts on cells of probability zero are reported at once."""
        total = observed.sum()
        probs = probs / probs.sum() if probs.sum() > 0 else probs
        zero = probs <= 1e-12
        if observed[zero].sum() > 0:
            self.fail("sampling", f"{int(observed[zero].sum())} samples fell in cells of probability zero: {description}")
            return []
        expected = probs * total
        small = expected < _MIN_EXPECTED
        cells_o = list(observed[~small]) + ([observed[small].sum()] if small.any() else [])
        cells_e = list(expected[~small]) + ([expected[small].sum()] if small.any() else [])
        if len(cells_e) > 1 and cells_e[-1] < _MIN_EXPECTED and small.any():
            smallest = int(np.argmin(cells_e[:-1]))
            cells_o[smallest] += cells_o.pop()
            cells_e[smallest] += cells_e.pop()
        if len(cells_e) < 2:
            return []
        o, e = np.array(cells_o, dtype=np.float64), np.array(cells_e)
        statistic = float(((o - e) ** 2 / e).sum())
        detail = f"{description}: observed {_fmt(o.astype(int), 8)} vs expected {_fmt(np.round(e, 1), 8)}"
        return [(statistic, len(e) - 1, detail)]

    # ---------------------------------------------------------------- flows

    def fd_step(self, magnitude: float) -> tuple[float, float]:
        """Central-difference step for a function of size ``magnitude`` in the circuit's
        dtype, and the rounding noise of the resulting derivative."""
        scale = self.eps * max(1.0, magnitude)
        return float(np.cbrt(scale)), 10 * scale ** (2 / 3)

    def flows(self) -> None:
        name = "flows"
        x, missing, weights = self.evidence
        x, missing, weights = x[:2], missing[:2], weights[:2]
        xt, mt, _ = self._tensors(x, missing, None)
        w = torch.as_tensor(weights, dtype=torch.float64, device=self.device).requires_grad_(True)
        named = getattr(self.circuit, "named_parameters", None)
        params = [] if named is None else [(key, p) for key, p in named() if p.requires_grad and p.is_floating_point()]
        if named is None:
            self.report.skipped["flows (parameters)"] = "the circuit has no named_parameters()"
        rows = self.circuit.log_prob(xt, mt, w)
        grads = torch.autograd.grad(rows.sum(), [w] + [p for _, p in params], allow_unused=True)
        grad, rows = grads[0].double().cpu().numpy(), rows.detach().cpu().double().numpy()
        entries = [tuple(int(j) for j in i) for i in np.argwhere(np.abs(grad) > 0.05)]
        picked = [entries[i] for i in self.rng.permutation(len(entries))[:4]]
        self.report.notes[name] = (f"{len(picked)} random soft-evidence entries (of {len(entries)} with |gradient| > 0.05) "
                                   f"on {len(x)} evidence rows, and the largest gradient entries of 2 random parameter tensors")
        parts, steps = [], []
        for b, i, k in picked:
            step, noise = self.fd_step(abs(rows[b]))
            plus, minus = weights[b:b + 1].copy(), weights[b:b + 1].copy()
            plus[0, i, k] += step
            minus[0, i, k] -= step
            parts += [(x[b:b + 1], missing[b:b + 1], plus), (x[b:b + 1], missing[b:b + 1], minus)]
            steps.append((step, noise))
        values = self.batched(parts)
        for j, ((b, i, k), (step, noise)) in enumerate(zip(picked, steps)):
            numeric = float(values[2 * j][0] - values[2 * j + 1][0]) / (2 * step)
            self.count(name)
            if abs(numeric - grad[b, i, k]) > noise + 0.05 * abs(numeric):
                self.fail(name, f"d log_prob / d soft_evidence[{b}, {i}, {k}] is {grad[b, i, k]:.6g} by autograd but "
                                f"{numeric:.6g} by finite differences at {self.describe(x[b], missing[b], weights[b])}")
        self.parameter_flows(params, grads[1:], float(rows.sum()), (xt, mt, w.detach()))

    def parameter_flows(self, params: list, grads: tuple, value: float, args: tuple) -> None:
        """Finite differences of ``log_prob(*args).sum()`` on the two largest gradient entries
        of up to two parameter tensors; each parameter is restored bit for bit."""
        name = "flows"
        step, noise = self.fd_step(abs(value))
        candidates = []
        for (key, p), g in zip(params, grads):
            if g is None:
                continue
            flat = g.detach().flatten()
            for index in torch.topk(flat.abs(), min(2, flat.numel())).indices.tolist():
                if abs(flat[index].item()) > 0.05:
                    candidates.append((key, p, flat[index].item(), index))
        with torch.no_grad():
            for position in self.rng.permutation(len(candidates))[:2]:
                key, p, analytic, index = candidates[position]
                saved = p.detach().clone()
                try:
                    p.view(-1)[index] += step
                    plus = float(self.circuit.log_prob(*args).sum())
                    p.copy_(saved)
                    p.view(-1)[index] -= step
                    minus = float(self.circuit.log_prob(*args).sum())
                finally:
                    p.copy_(saved)
                numeric = (plus - minus) / (2 * step)
                self.count(name)
                if abs(numeric - analytic) > noise + 0.05 * abs(numeric):
                    self.fail(name, f"d log_prob / d {key}[flat index {index}] is {analytic:.6g} by autograd but "
                                    f"{numeric:.6g} by finite differences")


def check_circuit(circuit: object, *, seed: int = 0, rows: int = 4, num_samples: int | None = None, alpha: float = 1e-4,
                  mpe: str = "max_product", max_enumeration: int = 4096,
                  properties: Iterable[str] = PROPERTIES) -> CheckReport:
    """Check a compiled circuit's queries against each other and the laws of probability.

    Args:
        circuit: a :class:`pclayer.TensorCircuit`, or any object with its query methods
            (``log_prob``, ``posterior``, ``sample``, ``mpe``) and attributes (``num_vars``,
            ``var_cats``, ``num_cats``); discrete variables only.
        seed: seed of every random choice (evidence, variables, samples): a fixed seed gives
            the same verdict on every run.
        rows: evidence rows per property.
        num_samples: draws per sampling setting (unconditional, conditional, conditional
            with soft evidence: one ``circuit.sample`` call of num_samples draws under one row
            of evidence each). Default: the fewest draws with which each chi-square test
            detects, with probability 0.99 at the false-alarm rate ``alpha``, a sampled
            marginal off by total variation 0.25 over the test's cells (about 300 at
            ``alpha=1e-4``). The report states the deviation detected at the chosen number.
        alpha: false-alarm rate of the sampling property (all its chi-square tests together).
        mpe: ``"max_product"`` (what ``TensorCircuit.mpe`` computes) or ``"exact"`` (for an
            ``mpe`` that maximises ``log_prob``, e.g. on deterministic circuits).
        max_enumeration: largest joint (product of the category counts) checked exhaustively.
        properties: the properties to run (default all; see the module docstring).

    Returns:
        A :class:`CheckReport` of what was checked.

    Raises:
        AssertionError: listing every violated property with the inputs that show it.
        ValueError: bad arguments, or a circuit with continuous variables.
    """
    for arg, value, minimum in (("seed", seed, 0), ("rows", rows, 1), ("num_samples", 1 if num_samples is None else num_samples, 1),
                                ("max_enumeration", max_enumeration, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{arg}: expected an int >= {minimum}, got {value!r}")
    if not isinstance(alpha, float) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected a float in (0, 1), got {alpha!r}")
    if mpe not in _MPE_MODES:
        raise ValueError(f"mpe: expected one of {_MPE_MODES}, got {mpe!r}")
    chosen = list(properties)
    unknown = [p for p in chosen if p not in PROPERTIES]
    if unknown or not chosen:
        raise ValueError(f"properties: expected a non-empty subset of {PROPERTIES}, got {chosen!r}")
    for attribute in ("num_vars", "var_cats", "num_cats", "log_prob", "posterior", "sample", "mpe"):
        if not hasattr(circuit, attribute):
            raise TypeError(f"circuit: expected a compiled circuit with {attribute!r} (a pclayer.TensorCircuit), "
                            f"got {type(circuit).__name__}")
    if any(int(k) == 0 for k in circuit.var_cats):
        raise ValueError("circuit: check_circuit supports discrete variables only; this circuit has Gaussian variables")
    start = time.perf_counter()
    checker = _Checker(circuit, seed, rows, num_samples, alpha, mpe, max_enumeration)
    for name in PROPERTIES:
        if name in chosen:
            began = time.perf_counter()
            try:
                getattr(checker, name)()
            except ZeroProbabilityError as err:
                checker.fail(name, f"a query raised {type(err).__name__} on evidence of positive probability: {err}")
            checker.report.timings[name] = time.perf_counter() - began
            if name not in checker.report.comparisons and not any(n == name for n, _ in checker.violations):
                checker.report.skipped[name] = "no applicable inputs (e.g. no evidence of positive probability)"
    checker.report.seconds = time.perf_counter() - start
    if checker.violations:
        failed = sorted({name for name, _ in checker.violations}, key=PROPERTIES.index)
        lines = [f"check_circuit: {len(checker.violations)} violation(s) of {', '.join(failed)}"]
        lines += [f"  [{name}] {message}" for name, message in checker.violations]
        raise AssertionError("\n".join(lines))
    return checker.report
