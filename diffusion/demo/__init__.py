"""``python -m diffusion.demo`` / ``codd-demo``: the factorization barrier and CoDD's fix, on a CPU in minutes.

Uses the small masked-diffusion transformer shipped with the package (trained on Shakespeare characters; or
trains one within the budget), fits an HMM CoDD layer over windows of 32 positions with the backbone frozen, and
reports the paper's gap table (one-step factorized vs sequential vs CoDD perplexity per masked token) and few-step
generation quality. See :mod:`diffusion.demo.pipeline`; the exact-oracle experiment is :mod:`diffusion.demo.oracle`
and the backbone's training entry point :mod:`diffusion.demo.train_backbone`.
"""

from diffusion.demo.cli import main

__all__ = ["main"]
