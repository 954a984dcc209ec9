"""Variance-exploding SDE (Song et al. 2021, eq. 9); the continuous limit of SMLD / NCSN."""

from __future__ import annotations

import math

import torch

from .base import SDE


class VESDE(SDE):
    """dx = sqrt(d sigma^2(t) / dt) dw with sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    The marginal is exact for the SDE started at t = 0:
    x_t | x_0 ~ N(x_0, (sigma(t)^2 - sigma_min^2) I), so the kernel variance is 0 at t = 0
    (score_sde approximates it by sigma(t)^2, which is off by sigma_min^2 everywhere). The prior is
    the same law at T for x_0 = 0: N(0, (sigma_max^2 - sigma_min^2) I).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def sde(self, x, t):
        # g(t)^2 = d sigma^2 / dt = 2 sigma(t)^2 log(sigma_max / sigma_min)
        g = self.sigma(t) * math.sqrt(2 * self._log_ratio)
        return torch.zeros_like(x), g

    def marginal_prob(self, x, t):
        # sigma(t)^2 - sigma_min^2 = sigma_min^2 (exp(2 t log r) - 1), computed without cancellation
        std = self.sigma_min * torch.sqrt(torch.expm1(2 * t * self._log_ratio))
        return x, std

    def prior_std(self) -> float:
        return math.sqrt(self.sigma_max**2 - self.sigma_min**2)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"
