"""Flow-matching probability paths as SDEs: rectified flow and the trigonometric path.

x_t = alpha(t) x_0 + sigma(t) z with
    rectified (Liu et al. 2023; Lipman et al. 2023's optimal-transport path): alpha = 1 - t,
        sigma = t;
    trig (the cosine path of Albergo & Vanden-Eijnden): alpha = cos(pi t / 2),
        sigma = sin(pi t / 2).
Every linear path is the marginal law of dx = f(t) x dt + g(t) dw with
    f = alpha' / alpha,   g^2 = d sigma^2 / dt - 2 f sigma^2 = 2 sigma (sigma' - f sigma),
so every sampler and likelihood of the toolkit runs on them, stochastic ones included.

The ends: alpha(1) = 0, where f and g^2 are infinite (rectified: f = -1 / (1 - t),
g^2 = 2t / (1 - t); trig: f = -pi/2 tan(pi t / 2), g^2 = pi tan(pi t / 2)). The process therefore
stops at T = 1 - `t_end` (default 1e-3, alpha(T) = 1e-3 and 1.6e-3), where the prior is
N(0, sigma(T)^2 I): it differs from the exact p_T only by the data's remaining alpha(T) x_0, a KL of
at most 1/2 alpha(T)^2 E|x_0|^2 / sigma(T)^2 (5e-7 nats per unit-variance dimension).
"""

from __future__ import annotations

import math

import torch

from .base import SDE, append_dims


class _Path(SDE):
    def __init__(self, t_end: float = 1e-3) -> None:
        if not 0 < t_end < 0.5:
            raise ValueError(f"need 0 < t_end < 0.5, got t_end={t_end}")
        self.t_end = float(t_end)
        self.T = 1.0 - self.t_end

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)), each (B,)."""
        raise NotImplementedError

    def rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(t), g(t)^2), each (B,)."""
        raise NotImplementedError

    def sde(self, x, t):
        f, g2 = self.rates(t)
        return append_dims(f, x.ndim) * x, g2.sqrt()

    def marginal_prob(self, x, t):
        alpha, sigma = self.coefficients(t)
        return append_dims(alpha, x.ndim) * x, sigma

    def prior_std(self) -> float:
        return float(self.coefficients(torch.tensor([self.T], dtype=torch.float64))[1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_end={self.t_end})"


class RectifiedFlowSDE(_Path):
    """alpha = 1 - t, sigma = t: f = -1 / (1 - t), g^2 = 2t / (1 - t)."""

    def coefficients(self, t):
        return 1 - t, t

    def rates(self, t):
        return -1 / (1 - t), 2 * t / (1 - t)


class TrigFlowSDE(_Path):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2): f = -pi/2 tan(pi t / 2),
    g^2 = pi tan(pi t / 2)."""

    def coefficients(self, t):
        theta = 0.5 * math.pi * t
        return torch.cos(theta), torch.sin(theta)

    def rates(self, t):
        tan = torch.tan(0.5 * math.pi * t)
        return -0.5 * math.pi * tan, math.pi * tan
