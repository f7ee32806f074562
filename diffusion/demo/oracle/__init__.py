"""``python -m diffusion.demo.oracle``: the factorization barrier and CoDD when the denoiser is perfect.

A teacher circuit fitted to the corpus is the data distribution, the backbone is its exact conditional marginals,
and every score is exact; see :mod:`diffusion.demo.oracle.experiment`.
"""

from diffusion.demo.oracle.cli import main

__all__ = ["main"]
