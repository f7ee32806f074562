"""diffusion: the Coupled Discrete Diffusion (CoDD) output layer for masked diffusion LMs.

:class:`CoDDLayer` puts a probabilistic circuit (from :mod:`pclayer`) over a window of
positions in product with a masked diffusion LM's per-position distributions;
:func:`codd_loss` is its exact training loss (paper Eq. 7).
"""

from diffusion import adapters
from diffusion.evidence import SparseLogits
from diffusion.generate import generate
from diffusion.layer import MODES, CoDDLayer
from diffusion.loss import codd_loss, mask_ratio
from diffusion.pretrained import from_pretrained, save_pretrained
from diffusion.sampling import REMASKING
from diffusion.train import train_codd, windowed_loss
from diffusion.windows import apply_to_block

__all__ = ["MODES", "REMASKING", "CoDDLayer", "SparseLogits", "adapters", "apply_to_block", "codd_loss",
           "from_pretrained", "generate", "mask_ratio", "save_pretrained", "train_codd", "windowed_loss"]
