"""Exact queries over a compiled circuit: thin functions over its layers."""

from pclayer.queries.log_prob import log_prob
from pclayer.queries.mpe import mpe
from pclayer.queries.posterior import posterior
from pclayer.queries.sample import SampleResult, sample

__all__ = ["log_prob", "posterior", "sample", "SampleResult", "mpe"]
