"""``python -m diffusion.demo`` / ``codd-demo``: the factorization barrier and CoDD's fix, on a CPU in minutes.

Trains a small masked-diffusion transformer on Shakespeare (characters), fits an HMM CoDD layer over windows of
32 positions with the backbone frozen, and reports the paper's gap table (one-step factorized vs sequential vs
CoDD perplexity per masked token) and few-step generation quality. See :mod:`diffusion.demo.pipeline`.
"""

from diffusion.demo.cli import main

__all__ = ["main"]
