"""Numerical kernels of the compiled program (torch path)."""

from pclayer.ops.cross_product_sum import cross_product_sum
from pclayer.ops.log_matmul_exp import log_matmul_exp
from pclayer.ops.masked_logsumexp import masked_logsumexp

__all__ = ["cross_product_sum", "log_matmul_exp", "masked_logsumexp"]
