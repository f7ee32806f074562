"""``search_size``: train circuits of growing size within a time budget and keep the one
that is best on validation data (larger models pay on larger data sets, and cost more)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pclayer.learn.fit import History, fit


@dataclass
class SizeTrial:
    """One trained size: ``size`` (the builder's argument), ``params`` (free parameters),
    the best validation and the matching training log-likelihood per sample, the seconds it
    took and its :class:`History`."""

    size: int
    params: int
    valid_ll: float
    train_ll: float
    seconds: float
    history: History


@dataclass
class SizeSearch:
    """What :func:`search_size` did.

    Attributes:
        circuit: the trained circuit of the best trial (highest validation likelihood).
        best: that trial.
        trials: every trained size, in the order tried.
        skipped: sizes not tried, each with the reason.
    """

    circuit: object
    best: SizeTrial
    trials: list[SizeTrial] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        """A short table of the trials, marking the kept one."""
        lines = ["size  params      valid LL   train LL   seconds  epochs"]
        for trial in self.trials:
            mark = "  <- kept" if trial is self.best else ""
            lines.append(f"{trial.size:>4}  {trial.params:>9,}  {trial.valid_ll:>9.4f}  {trial.train_ll:>9.4f}  "
                         f"{trial.seconds:>7.1f}  {len(trial.history.train_ll):>6}{mark}")
        lines += [f"{size:>4}  not tried: {reason}" for size, reason in self.skipped]
        return "\n".join(lines)


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    values = list(sizes) if isinstance(sizes, Sequence) and not isinstance(sizes, (str, bytes)) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values) \
            or values != sorted(set(values)):
        raise ValueError(f"sizes: expected a non-empty increasing sequence of positive ints, got {sizes!r}")
    return values


def _check_stages(stages: Sequence[dict]) -> list[dict]:
    values = list(stages) if isinstance(stages, Sequence) and not isinstance(stages, (str, bytes)) else None
    if not values or not all(isinstance(stage, dict) for stage in values):
        raise ValueError(f"stages: expected a non-empty sequence of dicts of fit options, got {stages!r}")
    for i, stage in enumerate(values):
        for name in ("time_limit", "valid_x", "progress"):
            if name in stage:
                raise ValueError(f"stages[{i}]: {name!r} is set by search_size; pass it as search_size's own argument")
    return values


def train_stages(circuit, x: torch.Tensor, valid_x: torch.Tensor, stages: Sequence[dict], *, time_limit: float,
                 progress: bool = True) -> History:
    """Train ``circuit`` by consecutive :func:`pclayer.learn.fit` calls (e.g. Adam, then EM).

    Each stage continues from the parameters the previous one kept; the circuit ends with
    the parameters of the best validation epoch over all stages.

    Args:
        circuit: a :class:`pclayer.TensorCircuit`, trained in place.
        x: (N, V) training rows; valid_x: (M, V) validation rows.
        stages: dicts of :func:`pclayer.learn.fit` options (``method``, ``epochs``,
            ``batch_size``, ``lr``, ``step_size``, ``pseudocount``, ``patience``, ...).
        time_limit: seconds for all stages; a stage after the first starts only while time is left.
        progress: passed to :func:`pclayer.learn.fit`.

    Returns:
        One :class:`History` over all epochs run (``method`` joins the stages' methods with
        ``" + "``; ``best_epoch`` indexes the concatenated epochs).
    """
    stages = _check_stages(stages)
    started = time.perf_counter()
    merged = History(" + ".join(stage.get("method", "em") for stage in stages))
    best_state = None
    for stage in stages:
        remaining = time_limit - (time.perf_counter() - started)
        if merged.valid_ll and remaining <= 0:  # the first stage always runs (as fit's first epoch does)
            break
        history = fit(circuit, x, valid_x=valid_x, time_limit=max(remaining, 1e-9), progress=progress, **stage)
        offset = len(merged.valid_ll)
        merged.train_ll += history.train_ll
        merged.valid_ll += history.valid_ll
        merged.stopped_early = history.stopped_early
        if merged.best_epoch < 0 or history.valid_ll[history.best_epoch] > merged.valid_ll[merged.best_epoch]:
            merged.best_epoch = offset + history.best_epoch
            best_state = {k: v.detach().clone() for k, v in circuit.params.items()}
        else:  # this stage found nothing better: back to the best parameters so far
            with torch.no_grad():
                for key, value in best_state.items():
                    circuit.params[key].copy_(value)
    merged.seconds = time.perf_counter() - started
    return merged


def search_size(build: Callable[[int], object], sizes: Sequence[int], x: torch.Tensor, valid_x: torch.Tensor, *,
                stages: Sequence[dict], time_limit: float, progress: bool = True) -> SizeSearch:
    """Train ``build(size)`` for growing ``sizes`` and keep the best on ``valid_x``.

    Sizes are tried in increasing order, each trained by :func:`train_stages` on ``x``
    with ``valid_x`` (so each ends with its best validation epoch's parameters). The search
    stops growing when a size is not better on validation than the best so far, or when
    the next size's predicted time (the last trial's seconds scaled by the ratio of
    parameter counts) exceeds what is left of ``time_limit``; every trial also gets the
    remaining time as its own ``time_limit``.

    Args:
        build: ``size -> TensorCircuit`` with fresh (random) parameters, e.g.
            ``lambda h: pc.compile(pc.structures.hclt(train, h, 2, seed=0))``.
        sizes: increasing positive sizes to try (e.g. hidden states 16, 32, 64, ...).
        x: (N, V) training rows; valid_x: (M, V) validation rows.
        stages: the training of every size (:func:`train_stages`), e.g.
            ``[dict(method="adam", epochs=30, batch_size=256, lr=(0.05, 0.001)),
            dict(method="em", epochs=10, batch_size=1024, pseudocount=0.1, patience=2)]``.
        time_limit: seconds for the whole search (building included).
        progress: show a bar per trial and print :meth:`SizeSearch.summary` at the end.

    Returns:
        A :class:`SizeSearch` whose ``circuit`` is the best trial's trained circuit.
    """
    sizes = _check_sizes(sizes)
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0:
        raise ValueError(f"time_limit: expected a positive number of seconds, got {time_limit!r}")
    stages = _check_stages(stages)
    started = time.perf_counter()
    trials: list[SizeTrial] = []
    skipped: list[tuple[int, str]] = []
    best: SizeTrial | None = None
    best_circuit = None
    for index, size in enumerate(sizes):
        circuit = build(size)
        params = circuit.num_parameters()
        remaining = time_limit - (time.perf_counter() - started)
        if trials:
            predicted = trials[-1].seconds * params / trials[-1].params
            if predicted > remaining:
                skipped += [(s, f"predicted {predicted:.0f} s, {max(remaining, 0):.0f} s left") for s in sizes[index:]]
                break
        history = train_stages(circuit, x, valid_x, stages, time_limit=max(remaining, 1e-9), progress=progress)
        trial = SizeTrial(size, params, history.valid_ll[history.best_epoch], history.train_ll[history.best_epoch],
                          history.seconds, history)
        trials.append(trial)
        if best is None or trial.valid_ll > best.valid_ll:
            best, best_circuit = trial, circuit
        elif index + 1 < len(sizes):
            skipped += [(s, f"size {size} was not better on validation than size {best.size}") for s in sizes[index + 1:]]
            break
    search = SizeSearch(best_circuit, best, trials, skipped)
    if progress:
        tqdm.write(search.summary())
    return search
