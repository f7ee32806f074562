"""pclayer: tractable probabilistic circuits with exact queries on CPU and GPU.

Build a circuit from node groups (:func:`inputs`, :func:`multiply`, :func:`summate`) or
a structure builder (:mod:`pclayer.structures`), :func:`compile` it, then query it:
``log_prob``, ``posterior``, ``sample``, ``mpe``.
"""

from pclayer import structures
from pclayer.circuit import TensorCircuit, compile
from pclayer.distributions import Bernoulli, Binomial, Categorical, Distribution, Gaussian, Indicator
from pclayer.errors import StructureError, ZeroProbabilityError
from pclayer.nodes import InputGroup, NodeGroup, ProductGroup, SumGroup, inputs, multiply, summate
from pclayer.queries import SampleResult, log_prob, mpe, posterior, sample
from pclayer.topk import TopKEvidence

__version__ = "0.1.0"

__all__ = [
    "Bernoulli", "Binomial", "Categorical", "Distribution", "Gaussian", "Indicator",
    "InputGroup", "NodeGroup", "ProductGroup", "SumGroup",
    "SampleResult", "StructureError", "TensorCircuit", "TopKEvidence", "ZeroProbabilityError",
    "compile", "inputs", "structures", "log_prob", "mpe", "multiply", "posterior", "sample", "summate",
]

from pclayer import io, learn  # noqa: E402  (both build on the core imported above)
from pclayer.io import load, save  # noqa: E402

__all__ += ["io", "learn", "load", "save"]
