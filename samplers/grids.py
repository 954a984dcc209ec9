"""Time grids for samplers, computed in float64 and kept apart from the solvers."""

from __future__ import annotations

import torch


def uniform_grid(steps: int, T: float = 1.0, eps: float = 1e-3) -> torch.Tensor:
    """steps + 1 times from T down to eps, evenly spaced, float64: (steps + 1,)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(T, eps, steps + 1, dtype=torch.float64)
