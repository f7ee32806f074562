"""Numerical kernels of the compiled program (torch path)."""

from pclayer.ops.log_matmul_exp import log_matmul_exp
from pclayer.ops.masked_logsumexp import masked_logsumexp

__all__ = ["log_matmul_exp", "masked_logsumexp"]
