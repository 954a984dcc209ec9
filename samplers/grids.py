"""Time grids for samplers, computed in float64 and kept apart from the solvers.

Every grid runs from T down to eps: (steps + 1,) float64, strictly decreasing, first T, last eps.
Grids that are uniform in some function of the noise level are mapped back to times by bisection,
using only the SDE's own `alpha_sigma`, so they hold for every SDE with a linear-Gaussian kernel.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import NamedTuple

import torch

from sde_lib import SDE


def uniform_grid(steps: int, T: float = 1.0, eps: float = 1e-3) -> torch.Tensor:
    """steps + 1 times from T down to eps, evenly spaced, float64: (steps + 1,)."""
    _check(steps, T, eps)
    return torch.linspace(T, eps, steps + 1, dtype=torch.float64)


def log_snr(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """Half log signal-to-noise ratio lambda(t) = log(alpha(t) / sigma(t)), (N,) float64."""
    alpha, sigma = sde.alpha_sigma(t.double())
    return alpha.log() - sigma.log()


def t_from_log_snr(sde: SDE, lam: torch.Tensor, T: float, eps: float) -> torch.Tensor:
    """Invert lambda(t) on [eps, T] by float64 bisection (lambda decreases in t): (N,) -> (N,)."""
    lam = lam.double()
    lo = torch.full_like(lam, eps)  # lambda(lo) >= lam
    hi = torch.full_like(lam, T)  # lambda(hi) <= lam
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = log_snr(sde, mid) > lam
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def logsnr_grid(sde: SDE, steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Times uniform in lambda = log(alpha / sigma) from T to eps (DPM-Solver, Lu et al. 2022)."""
    _check(steps, sde.T, eps)
    ends = log_snr(sde, torch.tensor([sde.T, eps], dtype=torch.float64))
    lam = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64)
    return _pin_ends(t_from_log_snr(sde, lam, sde.T, eps), sde.T, eps)


def edm_grid(sde: SDE, steps: int, eps: float = 1e-3, rho: float = 7.0) -> torch.Tensor:
    """Times with sigma/alpha spaced as in Karras et al. 2022 (EDM), eq. 5, with exponent rho."""
    _check(steps, sde.T, eps)
    ends = (-log_snr(sde, torch.tensor([sde.T, eps], dtype=torch.float64))).exp()  # sigma / alpha
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    s_max, s_min = ends[0] ** (1 / rho), ends[1] ** (1 / rho)
    noise = (s_max + ramp * (s_min - s_max)) ** rho
    return _pin_ends(t_from_log_snr(sde, -noise.log(), sde.T, eps), sde.T, eps)


GRIDS = ("uniform", "logsnr", "edm")


def get_grid(name: str, sde: SDE, steps: int, eps: float = 1e-3) -> torch.Tensor:
    """The named grid (one of GRIDS) for `sde`: (steps + 1,) float64 from T to eps."""
    if name == "uniform":
        return uniform_grid(steps, sde.T, eps)
    if name == "logsnr":
        return logsnr_grid(sde, steps, eps)
    if name == "edm":
        return edm_grid(sde, steps, eps)
    raise ValueError(f"unknown grid {name!r}; allowed: {', '.join(GRIDS)}")


class Step(NamedTuple):
    """One interval t -> s (t > s) of a grid with alpha and sigma at both ends, as Python floats."""

    t: float
    s: float
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float


def intervals(sde: SDE, ts: torch.Tensor, progress: bool = False) -> Iterator[Step]:
    """The consecutive intervals of a grid ts: (N + 1,), optionally with a tqdm bar.

    All coefficients are computed once, in float64, before the first step, so a sampler's loop
    touches only Python floats besides its tensors.
    """
    times = ts.double()
    alpha, sigma = (v.tolist() for v in sde.alpha_sigma(times))
    t = times.tolist()
    n = len(t) - 1
    steps = (Step(t[i], t[i + 1], alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]) for i in range(n))
    if progress:
        from tqdm.auto import tqdm

        return iter(tqdm(steps, total=n))
    return steps


def _pin_ends(t: torch.Tensor, T: float, eps: float) -> torch.Tensor:
    t[0], t[-1] = T, eps
    return t


def _check(steps: int, T: float, eps: float) -> None:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < eps < T:
        raise ValueError(f"eps must lie in (0, T) = (0, {T}), got {eps!r}")
