"""Parameter learning: EM from circuit flows, gradient training, data-parallel EM.

* :func:`compute_flows` — expected counts of one batch (a backward pass).
* :class:`FullBatchEM`, :class:`MiniBatchEM`, :func:`m_step` — EM.
* :func:`fit` — a training loop with progress bar, history, schedules and early stopping;
  :func:`train_stages` — several fits in a row (e.g. Adam, then EM);
  :func:`search_size` — growing model sizes within a time budget, best on validation kept.
* :func:`all_reduce_flows`, :func:`shard` — multi-process training on
  ``torch.distributed`` (see :mod:`pclayer.learn.distributed` for torchrun).

Gradient learning needs nothing special: ``circuit.parameters()`` are unconstrained
log-weights, so any ``torch.optim`` optimiser trains ``-circuit.log_prob(x).mean()``.
"""

from pclayer.learn.distributed import all_reduce_flows, shard
from pclayer.learn.em import FullBatchEM, MiniBatchEM, m_step
from pclayer.learn.fit import History, fit, schedule
from pclayer.learn.size_search import SizeSearch, SizeTrial, search_size, train_stages
from pclayer.learn.flows import Flows, compute_flows, zero_flows

__all__ = ["Flows", "FullBatchEM", "History", "MiniBatchEM", "SizeSearch", "SizeTrial", "all_reduce_flows",
           "compute_flows", "fit", "m_step", "schedule", "search_size", "shard", "train_stages", "zero_flows"]
