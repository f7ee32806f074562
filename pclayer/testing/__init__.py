"""Tools for property-based correctness tests of circuits, for users' own circuits.

* :mod:`pclayer.testing.reference`: exact float64 answers to every query, walking the
  symbolic circuit (``log_prob``, ``posterior``, ``mpe``, ``distribution``).
* :func:`check_circuit`: a battery of properties any compiled circuit must satisfy, run
  through its public query methods; raises ``AssertionError`` listing every violation.
* :mod:`pclayer.testing.strategies`: hypothesis strategies (``circuits``, ``evidence``);
  needs ``pip install pclayer[testing]``.
* :mod:`pclayer.testing.hmm`: forward algorithm and Viterbi, a reference for HMMs.

Only :mod:`pclayer.testing.strategies` needs hypothesis.
"""

from pclayer.testing import hmm, reference
from pclayer.testing.check import PROPERTIES, CheckReport, check_circuit

__all__ = ["PROPERTIES", "CheckReport", "check_circuit", "hmm", "reference"]
