"""The oracle experiment's data distribution and its perfect denoiser.

The *teacher* is a circuit (a homogeneous HMM) fitted to windows of the corpus with pclayer's EM; it *is* the
data distribution of the experiment. :class:`ExactOracle` is the perfect factorized denoiser for it: given a
partially masked window ``x_t`` it returns the teacher's exact conditional marginals ``p(x^i | x_t)`` (one
``posterior`` query), so the only error left in a one-step prediction is the factorization.
"""

from __future__ import annotations

import time

import torch

import pclayer


def fit_teacher(windows: torch.Tensor, *, states: int, vocab_size: int, seconds: float, seed: int,
                batch_size: int = 256) -> tuple[pclayer.TensorCircuit, list[float]]:
    """A homogeneous ``states``-state HMM over the ``W`` positions of ``windows`` (N, W), fitted by mini-batch EM.

    EM (:func:`pclayer.learn.fit`, ``method="minibatch_em"``) runs epoch by epoch over the shuffled windows until
    ``seconds`` have passed (at least one epoch).

    Returns:
        The circuit and the mean training log-likelihood per window after each epoch (nats).
    """
    circuit = pclayer.compile(pclayer.structures.hmm(windows.shape[1], states, vocab_size, homogeneous=True,
                                                     seed=seed))
    history: list[float] = []
    started = time.perf_counter()
    epoch = 0
    while not history or time.perf_counter() - started < seconds:
        fitted = pclayer.learn.fit(circuit, windows, epochs=1, batch_size=batch_size, method="minibatch_em",
                                   seed=seed + epoch, progress=False)
        history.append(float(fitted.train_ll[-1]))
        epoch += 1
    return circuit, history


class ExactOracle:
    """The teacher's exact conditional marginals as a backbone: ``x_t (B, W) -> log p(x^i | x_t)`` (B, W, V).

    Masked positions (``x_t == mask_id``) are summed out; every other position is hard evidence, so its row is
    the one-hot of its token (``log 1 = 0``, ``-inf`` elsewhere). With ``memoize=True`` each distinct row is
    computed once (training re-reads the same noisy rows every epoch and for every student).

    Attributes:
        seconds: wall time spent in ``posterior`` queries; ``calls``: rows computed (memo misses).
    """

    def __init__(self, teacher: pclayer.TensorCircuit, mask_id: int, *, memoize: bool = False):
        self.teacher = teacher
        self.mask_id = mask_id
        self.vocab_size = int(mask_id)
        self.memo: dict[bytes, torch.Tensor] | None = {} if memoize else None
        self.seconds = 0.0
        self.calls = 0

    def _compute(self, x_t: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        missing = x_t == self.mask_id
        with torch.no_grad():
            marginals = self.teacher.posterior(torch.where(missing, torch.zeros_like(x_t), x_t), missing=missing)
        self.seconds += time.perf_counter() - started
        self.calls += x_t.shape[0]
        return torch.log(marginals).float()

    def __call__(self, x_t: torch.Tensor) -> torch.Tensor:
        if not isinstance(x_t, torch.Tensor) or x_t.ndim != 2 or x_t.shape[1] != self.teacher.num_vars:
            raise ValueError(f"x_t: expected a (B, {self.teacher.num_vars}) tensor of token ids, got "
                             f"{getattr(x_t, 'shape', type(x_t).__name__)}")
        if bool(((x_t < 0) | (x_t > self.mask_id)).any()):
            raise ValueError(f"x_t: token ids must lie in [0, {self.vocab_size}) or equal mask_id {self.mask_id}")
        if self.memo is None:
            return self._compute(x_t)
        keys = [row.numpy().tobytes() for row in x_t.cpu()]
        first = {}
        for i, key in enumerate(keys):
            if key not in self.memo:
                first.setdefault(key, i)
        todo = list(first.values())
        if todo:
            fresh = self._compute(x_t[todo])
            for i, row in zip(todo, fresh):
                self.memo[keys[i]] = row
        return torch.stack([self.memo[key] for key in keys])


def conditional_nll(teacher: pclayer.TensorCircuit, x_0: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(B,) exact ``-log p(x_0^M | x_0^U)`` under the teacher: ``log_prob(x_0, missing=M) - log_prob(x_0)``.

    This is the sequential chain rule of a perfect denoiser in any order, hence the true conditional entropy in
    expectation over teacher samples.
    """
    with torch.no_grad():
        return (teacher.log_prob(x_0, missing=masked) - teacher.log_prob(x_0)).double()
