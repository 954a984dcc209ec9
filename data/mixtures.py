"""Gaussian-mixture data laws with exact densities (the closed-form references of the toolkit)."""

from __future__ import annotations

import math

import torch

from models.exact import GaussianMixture


def gmm8(radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """8 equal-weight isotropic Gaussians evenly spaced on a circle of the given radius."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.full((8,), 1 / 8), means, std**2)


def mixture5d() -> GaussianMixture:
    """3 Gaussians in 5-D with unequal weights (0.5, 0.3, 0.2) and diagonal covariances."""
    means = torch.tensor(
        [
            [1.5, 0.0, -1.0, 0.5, 0.0],
            [-1.5, 1.0, 0.5, -0.5, 1.0],
            [0.0, -1.5, 1.0, 1.0, -1.0],
        ],
        dtype=torch.float64,
    )
    variances = torch.tensor(
        [
            [0.10, 0.20, 0.05, 0.15, 0.10],
            [0.20, 0.05, 0.10, 0.10, 0.25],
            [0.05, 0.10, 0.20, 0.05, 0.15],
        ],
        dtype=torch.float64,
    )
    return GaussianMixture([0.5, 0.3, 0.2], means, variances)
