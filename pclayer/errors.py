"""Exceptions raised by pclayer."""


class StructureError(ValueError):
    """A circuit is not smooth, not decomposable, or otherwise malformed."""


class ZeroProbabilityError(ValueError):
    """A query needs a distribution conditioned on evidence of probability zero."""
