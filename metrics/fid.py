"""Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017).

For X ~ N(mu_1, S_1) and Y ~ N(mu_2, S_2) the squared 2-Wasserstein (Fréchet) distance is

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^(1/2)).

S_1 S_2 is not symmetric, but it is similar to the symmetric positive semi-definite matrix
M = S_1^(1/2) S_2 S_1^(1/2) (conjugate by S_1^(1/2)), so Tr((S_1 S_2)^(1/2)) = sum_i sqrt(l_i(M)).
Both square roots are taken from symmetric eigen-decompositions in float64 with negative round-off
eigenvalues clipped to 0: no complex parts and no failure on singular covariances (fewer samples
than feature dimensions), where `scipy.linalg.sqrtm(S_1 @ S_2)` needs an epsilon fix-up.
With Inception-v3 pool features this is the FID.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_double(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().cpu().double()


def gaussian_fit(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2."""
    f = _as_double(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2; got shape {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (D, D) via eigh, eigenvalues clipped at 0."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(s1, s2) -> float:
    """Tr((S_1 S_2)^(1/2)) for symmetric PSD S_1, S_2 (D, D): sum of sqrt eig(S_1^½ S_2 S_1^½)."""
    a, b = _as_double(s1), _as_double(s2)
    r = _psd_sqrt(a)
    m = r @ b @ r
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """Squared Fréchet distance between N(mu1, s1) and N(mu2, s2): mu (D,), s (D, D); float64."""
    m1, m2, a, b = (_as_double(v) for v in (mu1, mu2, s1, s2))
    if m1.shape != m2.shape or a.shape != b.shape or a.shape != (m1.numel(), m1.numel()):
        raise ValueError(
            f"shapes do not match: mu {tuple(m1.shape)}, {tuple(m2.shape)}; "
            f"cov {tuple(a.shape)}, {tuple(b.shape)}"
        )
    d2 = float((m1 - m2).square().sum()) + float(a.trace() + b.trace())
    return max(d2 - 2 * trace_sqrt_product(a, b), 0.0)


def fid_from_features(f1, f2) -> float:
    """Fréchet distance between the Gaussian fits of features f1 (N, D) and f2 (M, D)."""
    return frechet_distance(*gaussian_fit(f1), *gaussian_fit(f2))
