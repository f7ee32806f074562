"""Structure builders: functions that return the root group of a symbolic circuit."""

from pclayer.structures.hmm import hmm

__all__ = ["hmm"]
