"""Numerical constants shared by the representations and the exact log-space kernels."""

from __future__ import annotations

import torch

SAFE_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-20, torch.float32: 1e-30, torch.float64: 1e-290}
"""A linear-space value below this (absolute; every scaled entry is at most 1) may have lost
precision to underflow. The scaled representation then computes its layer in log space, and
:func:`pclayer.ops.log_matmul_exp.log_matmul_exp` recomputes such rows with per-node shifts."""

RENORMALISE_BELOW = {torch.float16: 1e-2, torch.bfloat16: 1e-10, torch.float32: 1e-10, torch.float64: 1e-100}
"""A scaled layer whose smallest entry falls below this has its rows divided by their maximum."""

CONVEX_SLACK = 0.5
"""Factor applied to a sum's proven lower bound (the smallest child entry) for rounding."""
