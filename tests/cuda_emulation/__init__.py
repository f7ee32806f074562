"""Test-only CPU emulation of pclayer's CUDA kernels (g++ + a portability header + fibers)."""
