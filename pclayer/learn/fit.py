"""``fit``: train a compiled circuit on a data set with EM or Adam, with a progress bar,
a per-epoch history and early stopping on a validation split."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pclayer.learn.em import FullBatchEM, MiniBatchEM
from pclayer.learn.flows import check_weights
from pclayer.queries.evidence import prepare

METHODS = ("em", "minibatch_em", "adam")


@dataclass
class Dataset:
    """Rows of training or validation data: x (N, V), optional missing (N, V),
    soft_evidence (N, V, K) and weights (N,)."""

    x: torch.Tensor
    missing: torch.Tensor | None = None
    soft_evidence: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, index: torch.Tensor) -> Dataset:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return Dataset(self.x[index], pick(self.missing), pick(self.soft_evidence), pick(self.weights))

    def batches(self, batch_size: int, generator: torch.Generator | None) -> list[Dataset]:
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        return [self.rows(index.to(self.x.device)) for index in order.split(batch_size)]


@dataclass
class History:
    """What :func:`fit` did. Log-likelihoods are weighted means per sample (nats),
    measured after each epoch's updates.

    Attributes:
        method: the training method.
        train_ll: training log-likelihood after each epoch.
        valid_ll: validation log-likelihood after each epoch (empty without validation data).
        best_epoch: index of the epoch whose parameters the circuit holds at the end: the
            best validation epoch with validation data, else the last one.
        stopped_early: whether early stopping or the time limit ended training before ``epochs``.
        seconds: wall-clock seconds of training and evaluation.
    """

    method: str
    train_ll: list[float] = field(default_factory=list)
    valid_ll: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    seconds: float = field(default=0.0, compare=False)

    def summary(self) -> str:
        """A short human-readable report."""
        if not self.train_ll:
            return f"fit ({self.method}): no epochs run"
        lines = [f"fit ({self.method}): {len(self.train_ll)} epochs in {self.seconds:.1f} s"
                 + (" (stopped early)" if self.stopped_early else ""),
                 f"  train log-likelihood per sample: {self.train_ll[0]:.4f} -> {self.train_ll[-1]:.4f}"]
        if self.valid_ll:
            lines.append(f"  valid log-likelihood per sample: {self.valid_ll[0]:.4f} -> {self.valid_ll[-1]:.4f}, "
                         f"best {self.valid_ll[self.best_epoch]:.4f} at epoch {self.best_epoch + 1} (parameters kept)")
        return "\n".join(lines)


def _mean_log_likelihood(circuit, data: Dataset, batch_size: int, distributed: bool) -> float:
    total = torch.zeros(2, dtype=torch.float64, device=circuit.device)
    with torch.no_grad():
        for batch in data.batches(batch_size, None):
            log_p = circuit.log_prob(batch.x, missing=batch.missing, soft_evidence=batch.soft_evidence).double()
            w = torch.ones_like(log_p) if batch.weights is None else batch.weights.double()
            total += torch.stack([(w * log_p).sum(), w.sum()])
    if distributed:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


def _check_rows(name: str, x: object, distributed: bool, device: torch.device) -> None:
    """Training (or validation) data needs at least one row (on some rank when distributed)."""
    rows = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim >= 1 else None
    if rows is None:
        return  # shape errors are reported by the evidence checks
    if distributed:
        count = torch.tensor([float(rows)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(count)
        rows = int(count.item())
    if rows == 0:
        raise ValueError(f"{name}: expected at least one row of data, got an empty tensor of shape {tuple(x.shape)}")


def _split(data: Dataset, valid: Dataset | None, valid_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction: expected a number in [0, 1), got {valid_fraction!r}")
    if valid_fraction == 0:
        return data, valid
    if valid is not None:
        raise ValueError("valid_fraction: give either valid_x or valid_fraction, not both")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).to(data.x.device)
    cut = len(data) - max(1, round(valid_fraction * len(data)))
    if cut < 1:
        raise ValueError(f"valid_fraction: {valid_fraction} leaves no training rows out of {len(data)}")
    return data.rows(order[:cut]), data.rows(order[cut:])


def _informative(batch: Dataset) -> Dataset:
    """The rows that carry information for a gradient step: rows with every value missing
    and no soft evidence have likelihood 1 whatever the parameters (their gradient is zero
    up to rounding, which Adam would rescale into a real step), so they are dropped."""
    if batch.missing is None or batch.soft_evidence is not None:
        return batch
    return batch.rows((~batch.missing.all(dim=1)).nonzero().flatten())


def soften(data: Dataset, softening: float, num_cats: torch.Tensor) -> Dataset:
    """Data softening: each observed value ``x_i`` becomes soft evidence that keeps it with
    probability ``1 - softening`` and spreads ``softening`` evenly over the other categories.

    Args:
        data: rows with (N, V) ``x``; entries marked ``missing`` stay missing; no
            ``soft_evidence`` of its own.
        softening: in [0, 1).
        num_cats: (V,) categories per variable (all >= 2: continuous variables cannot be softened).

    Returns:
        The same rows with every entry missing and (N, V, max K) log-weight soft evidence;
        the likelihood of a row is then the expectation of ``p`` over perturbed copies of it.
    """
    if data.soft_evidence is not None:
        raise ValueError("softening: cannot be combined with soft_evidence; fold the softening into your evidence")
    width = int(num_cats.max())
    cats = num_cats.to(data.x.device)
    spread = (softening / (cats - 1).clamp_min(1).double())[None, :, None].expand(len(data), -1, width)
    beyond = torch.arange(width, device=data.x.device)[None, None, :] >= cats[None, :, None]  # not a category
    probs = spread.masked_fill(beyond, 0.0)  # a new (N, V, K) tensor
    probs.scatter_(2, data.x.long()[:, :, None], 1.0 - softening)
    log_weights = probs.log()
    observed = torch.ones_like(data.x, dtype=torch.bool) if data.missing is None else ~data.missing
    log_weights = torch.where(observed[:, :, None], log_weights, torch.zeros_like(log_weights))
    return Dataset(data.x, torch.ones_like(data.x, dtype=torch.bool), log_weights, data.weights)


def schedule(value: float | tuple[float, float], name: str) -> Callable[[float], float]:
    """A value over training: ``value`` itself, or a cosine decay from ``start`` to ``end``.

    Args:
        value: a positive number (constant) or a pair ``(start, end)`` of positive numbers.
        name: the argument's name, for errors.

    Returns:
        ``f(progress)`` for ``progress`` in [0, 1] (the fraction of updates done): for a pair,
        ``end + (start - end) * (1 + cos(pi * progress)) / 2``, i.e. ``start`` at the first
        update and ``end`` at the last.
    """
    pair = value if isinstance(value, tuple) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"{name}: expected a positive number or a pair (start, end) of positive numbers, got {value!r}")
    start, end = float(pair[0]), float(pair[1])

    def at(progress: float) -> float:
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return at


def _train_epoch(circuit, learner: FullBatchEM | MiniBatchEM | torch.optim.Optimizer, batches: list[Dataset],
                 set_rate: Callable[[int], None]) -> None:
    """One pass over ``batches``: full-batch EM accumulates and steps once at the end,
    mini-batch EM steps per batch, an optimiser descends the weighted mean NLL per batch.
    ``set_rate(i)`` sets the step size or learning rate before the update of batch ``i``."""
    for index, batch in enumerate(batches):
        if isinstance(learner, FullBatchEM):
            learner.accumulate(batch.x, batch.missing, batch.soft_evidence, batch.weights)
        elif isinstance(learner, MiniBatchEM):
            set_rate(index)
            learner.step(batch.x, batch.missing, batch.soft_evidence, batch.weights)
        else:
            batch = _informative(batch)
            if len(batch) == 0:
                continue
            set_rate(index)
            learner.zero_grad()
            log_p = circuit.log_prob(batch.x, missing=batch.missing, soft_evidence=batch.soft_evidence)
            w = torch.ones_like(log_p) if batch.weights is None else batch.weights.to(log_p.dtype)
            (-(w * log_p).sum() / w.sum()).backward()
            learner.step()
    if isinstance(learner, FullBatchEM):
        learner.step()


def fit(circuit, x: torch.Tensor, *, epochs: int, batch_size: int, method: str = "em",
        missing: torch.Tensor | None = None, soft_evidence: torch.Tensor | None = None,
        weights: torch.Tensor | None = None, valid_x: torch.Tensor | None = None,
        valid_missing: torch.Tensor | None = None, valid_soft_evidence: torch.Tensor | None = None,
        valid_weights: torch.Tensor | None = None, valid_fraction: float = 0.0, patience: int | None = None,
        step_size: float | tuple[float, float] = 0.1, lr: float | tuple[float, float] = 0.05,
        pseudocount: float = 0.0, min_std: float = 1e-3,
        softening: float = 0.0, time_limit: float | None = None, seed: int = 0, distributed: bool = False,
        progress: bool = True) -> History:
    """Train ``circuit`` in place on rows ``x`` and return the :class:`History`.

    Args:
        circuit: a :class:`pclayer.TensorCircuit`.
        x: (N, num_vars) training data; ``missing`` (N, num_vars) bool, ``soft_evidence``
            (N, num_vars, num_cats) log-weights and ``weights`` (N,) are optional.
        epochs: maximum number of passes over the data.
        batch_size: rows per forward/backward pass (and per update for mini-batch methods).
        method: ``"em"`` (full-batch EM: flows of the whole epoch, then one exact M-step;
            never decreases the training likelihood), ``"minibatch_em"`` (stochastic EM:
            an M-step per batch on expected counts averaged with ``step_size``) or ``"adam"`` (``torch.optim.Adam`` with ``lr``
            on the mean negative log-likelihood of each batch; rows with every value missing
            and no soft evidence carry no information and are skipped).
        valid_x, valid_missing, valid_soft_evidence, valid_weights: validation data, or
        valid_fraction: hold out this fraction of ``x`` (a seeded random split) instead.
        step_size: mini-batch EM's weight of each batch (:class:`MiniBatchEM`), and
        lr: Adam's learning rate; each a number, or a pair ``(start, end)`` decayed by a
            cosine over the updates of all ``epochs`` (:func:`schedule`; an early stop ends
            the decay early).
        patience: stop after this many epochs without a better validation likelihood
            (needs validation data). ``None``: run all epochs. With validation data the
            circuit ends with the parameters of the best validation epoch.
        pseudocount, min_std: EM smoothing and Gaussian standard-deviation floor.
        softening: train on softened rows (:func:`soften`): each observed value is kept
            with probability ``1 - softening``, a regulariser for discrete data. The
            reported likelihoods, validation and the best-epoch choice use the rows as given.
        time_limit: seconds of training (``None``: no limit): no epoch starts that the last
            one's duration predicts would end past it (the first epoch always runs). The
            best-epoch rule applies as for ``patience``.
        seed: seeds the validation split and the batch shuffling.
        distributed: data-parallel over ``torch.distributed`` (method ``"em"`` only): every
            rank passes its own shard as ``x``; flows and reported likelihoods are summed
            over ranks, so all ranks end with the same parameters.
        progress: show a tqdm bar over epochs and print :meth:`History.summary` at the end.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    step_sizes, rates = schedule(step_size, "step_size"), schedule(lr, "lr")
    if max(step_sizes(0.0), step_sizes(1.0)) > 1:
        raise ValueError(f"step_size: expected values in (0, 1], got {step_size!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if distributed and method != "em":
        raise ValueError(f"distributed: fit supports method='em' across ranks, got {method!r}; for Adam wrap the "
                         "circuit in torch.nn.parallel.DistributedDataParallel")
    _check_rows("x", x, distributed, circuit.device)
    prepare(circuit, x, missing, soft_evidence)  # fail before training, not at the first bad batch
    check_weights(weights, x.shape[0], circuit.dtype, circuit.device)
    valid = None
    if valid_x is not None:
        _check_rows("valid_x", valid_x, distributed, circuit.device)
        prepare(circuit, valid_x, valid_missing, valid_soft_evidence)
        check_weights(valid_weights, valid_x.shape[0], circuit.dtype, circuit.device)
        valid = Dataset(valid_x, valid_missing, valid_soft_evidence, valid_weights)
    train, valid = _split(Dataset(x, missing, soft_evidence, weights), valid, valid_fraction, seed)
    if not (isinstance(softening, (int, float)) and not isinstance(softening, bool) and 0 <= softening < 1):
        raise ValueError(f"softening: expected a number in [0, 1), got {softening!r}")
    if softening > 0 and (circuit.has_continuous or int(circuit.var_cats.min()) < 2):
        raise ValueError("softening: needs every variable discrete with at least 2 categories")
    learn_from = soften(train, softening, circuit.var_cats) if softening > 0 else train
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or not time_limit > 0):
        raise ValueError(f"time_limit: expected a positive number of seconds or None, got {time_limit!r}")
    if patience is not None and (valid is None or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience: expected a positive int together with validation data, got {patience!r}"
                         + ("" if valid is not None else " and no validation data"))
    generator = torch.Generator().manual_seed(seed)
    history = History(method)
    started = time.perf_counter()
    best_state: dict[str, torch.Tensor] | None = None
    if method == "em":
        learner = FullBatchEM(circuit, pseudocount=pseudocount, min_std=min_std, distributed=distributed)
    elif method == "minibatch_em":
        learner = MiniBatchEM(circuit, step_size=step_sizes(0.0), pseudocount=pseudocount, min_std=min_std)
    else:
        learner = torch.optim.Adam(circuit.parameters(), lr=rates(0.0))
    batches_per_epoch = math.ceil(len(learn_from) / batch_size)

    def set_rate(epoch: int, index: int) -> None:
        done = (epoch * batches_per_epoch + index) / max(epochs * batches_per_epoch - 1, 1)
        if isinstance(learner, MiniBatchEM):
            learner.step_size = step_sizes(done)
        else:
            for group in learner.param_groups:
                group["lr"] = rates(done)

    bar = tqdm(range(epochs), desc=f"fit ({method})", disable=not progress)
    for epoch in bar:
        _train_epoch(circuit, learner, learn_from.batches(batch_size, generator), lambda i: set_rate(epoch, i))
        history.train_ll.append(_mean_log_likelihood(circuit, train, batch_size, distributed))
        postfix = {"train_ll": f"{history.train_ll[-1]:.4f}"}
        if valid is not None:
            history.valid_ll.append(_mean_log_likelihood(circuit, valid, batch_size, distributed))
            postfix["valid_ll"] = f"{history.valid_ll[-1]:.4f}"
            if history.best_epoch < 0 or history.valid_ll[-1] > history.valid_ll[history.best_epoch]:
                history.best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in circuit.params.items()}
        else:
            history.best_epoch = epoch
        bar.set_postfix(postfix)
        epoch_seconds = time.perf_counter() - started - history.seconds
        history.seconds += epoch_seconds
        out_of_patience = patience is not None and epoch - history.best_epoch >= patience
        if out_of_patience or (time_limit is not None and history.seconds + epoch_seconds > time_limit):
            history.stopped_early = epoch + 1 < epochs
            break
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for key, value in best_state.items():
                circuit.params[key].copy_(value)
    if progress:
        tqdm.write(history.summary())
    return history
