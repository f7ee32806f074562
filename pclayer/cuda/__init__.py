"""CUDA kernels of pclayer's hot passes (``*.cu``) and their launches.

Nothing here imports cupy at import time: :mod:`pclayer.cuda.ops` turns torch tensors into
kernel launches for any runner, and :mod:`pclayer.cuda.cupy_runner` (imported only by
:mod:`pclayer.ops.dispatch` when CUDA tensors arrive) runs them with cupy. See README.md.
"""
