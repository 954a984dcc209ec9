"""Variance-preserving and sub-variance-preserving SDEs (Song et al. 2021, eqs. 11 and 12)."""

from __future__ import annotations

import torch

from .base import SDE, append_dims


class _LinearBeta(SDE):
    """Shared linear noise schedule beta(t) = beta_min + t (beta_max - beta_min)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(
                f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}"
            )
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        # log alpha(t) = -1/2 int_0^t beta(s) ds = -1/4 t^2 (b_max - b_min) - 1/2 t b_min
        return -0.25 * t.square() * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VPSDE(_LinearBeta):
    """dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw; the continuous limit of DDPM."""

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * append_dims(beta, x.ndim) * x, beta.sqrt()

    def marginal_prob(self, x, t):
        # x_t | x_0 ~ N(alpha x_0, (1 - alpha^2) I)
        log_a = self.log_alpha(t)
        std = torch.sqrt(-torch.expm1(2 * log_a))
        return append_dims(log_a.exp(), x.ndim) * x, std

    def prior_std(self) -> float:
        return 1.0


class subVPSDE(_LinearBeta):
    """dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw."""

    def sde(self, x, t):
        beta = self.beta(t)
        discount = -torch.expm1(4 * self.log_alpha(t))  # 1 - exp(-2 int_0^t beta(s) ds)
        return -0.5 * append_dims(beta, x.ndim) * x, torch.sqrt(beta * discount)

    def marginal_prob(self, x, t):
        # x_t | x_0 ~ N(alpha x_0, (1 - alpha^2)^2 I)
        log_a = self.log_alpha(t)
        return append_dims(log_a.exp(), x.ndim) * x, -torch.expm1(2 * log_a)

    def prior_std(self) -> float:
        return 1.0
