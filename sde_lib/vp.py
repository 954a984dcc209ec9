"""Variance-preserving and sub-variance-preserving SDEs (Song et al. 2021, eqs. 11 and 12)."""

from __future__ import annotations

import math

import torch

from .base import SDE, append_dims

SCHEDULES = ("linear", "cosine")
COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17


class _LinearBeta(SDE):
    """Shared noise schedule beta(t), with log alpha(t) = -1/2 int_0^t beta(s) ds.

    "linear" (default): beta(t) = beta_min + t (beta_max - beta_min), the continuous limit of
    DDPM's T = 1000 linear betas 1e-4 .. 0.02 (beta_i = beta(t_i) / T).
    "cosine" (Nichol & Dhariwal 2021): alpha(t)^2 = f(t) / f(0), f(t) = cos^2(pi/2 (t + s)/(1 + s)),
    s = 0.008, i.e. beta(t) = pi / (1 + s) tan(pi/2 (t + s)/(1 + s)). That beta is infinite at
    t = 1 (alpha_1 = 0); to keep it safe at the end point it is capped at beta_max: from the time
    t* where it reaches beta_max (t* = 0.909 for beta_max = 20) beta stays beta_max, so alpha_1^2
    = 0.0038 and every coefficient stays finite (the continuous counterpart of clipping the
    discrete betas, their eq. 17 and below). beta_min is not used by "cosine".
    """

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, schedule: str = "linear"
    ) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(
                f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.schedule = schedule
        s = COSINE_S
        theta_cap = math.atan(self.beta_max * (1 + s) / math.pi)
        self._t_cap = min(theta_cap * 2 * (1 + s) / math.pi - s, self.T)

    def _theta(self, t):
        return (0.5 * math.pi / (1 + COSINE_S)) * (t + COSINE_S)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "cosine":
            tc = t.clamp_max(self._t_cap)
            b = (math.pi / (1 + COSINE_S)) * torch.tan(self._theta(tc))
            return torch.where(t > self._t_cap, torch.full_like(b, self.beta_max), b)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "cosine":
            tc = t.clamp_max(self._t_cap)
            la = torch.log(torch.cos(self._theta(tc))) - math.log(math.cos(self._theta(0.0)))
            return la - 0.5 * self.beta_max * (t - tc)
        # log alpha(t) = -1/2 int_0^t beta(s) ds = -1/4 t^2 (b_max - b_min) - 1/2 t b_min
        return -0.25 * t.square() * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def __repr__(self) -> str:
        extra = f", schedule={self.schedule!r}" if self.schedule != "linear" else ""
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max}{extra})"


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
