"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel.

k(x, y) = (x·y / d + 1)^3 for features of dimension d, and for x: (m, d), y: (n, d)

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n),

an unbiased estimate (it can be negative). KID averages it over random subsets of both sets
(without replacement within a subset), as in the paper's reference code; the spread over subsets
is reported as its standard deviation.
"""

from __future__ import annotations

import numpy as np
import torch


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x_i, y_j) = (x_i·y_j / d + 1)^3 for x: (m, d), y: (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased polynomial-kernel MMD^2 between x: (m, d) and y: (n, d), m, n >= 2; float64."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).double()
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).double()
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need (m, d) and (n, d) with m, n >= 2; got {x.shape}, {y.shape}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(
    real, fake, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID between real (N, d) and fake (M, d) features: (mean, std) of MMD^2_u over subsets.

    Each subset draws min(subset_size, N, M) rows of each set without replacement, from a
    generator seeded with `seed` (so a call is reproducible). With n_subsets = 1 the std is 0.
    """
    real = torch.as_tensor(np.asarray(real) if not torch.is_tensor(real) else real).double()
    fake = torch.as_tensor(np.asarray(fake) if not torch.is_tensor(fake) else fake).double()
    size = min(subset_size, real.shape[0], fake.shape[0])
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        i = torch.randperm(real.shape[0], generator=g)[:size]
        j = torch.randperm(fake.shape[0], generator=g)[:size]
        values.append(mmd2_unbiased(real[i], fake[j]))
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


__all__ = ["kid", "mmd2_unbiased", "polynomial_kernel"]
