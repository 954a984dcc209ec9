"""Abstract continuous-time SDE and the generic reverse-time SDE / probability-flow ODE.

Forward SDE (Song et al. 2021, eq. 5):      dx = f(x, t) dt + g(t) dw
Reverse SDE (eq. 6):                        dx = [f - g^2 * score] dt + g dw_bar
Probability-flow ODE (eq. 13):              dx = [f - 1/2 g^2 * score] dt

Shapes: x is (B, *D) for any data rank; t is (B,) in [0, T]. Per-example scalars such as the
diffusion g(t) or the marginal std are returned with shape (B,) and broadcast with `append_dims`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch

from .noise import as_noise

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so that a (B,) tensor broadcasts against a rank-`ndim` one."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a rank-{v.ndim} tensor to rank {ndim}")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class SDE(abc.ABC):
    """A forward SDE dx = f(x, t) dt + g(t) dw on t in [0, T] with a tractable Gaussian prior."""

    T: float = 1.0

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (drift f(x, t): (B, *D), diffusion g(t): (B,))."""

    @abc.abstractmethod
    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, *D) and std (B,) of the perturbation kernel p_{0t}(x_t | x_0 = x)."""

    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic, zero-mean Gaussian prior p_T."""

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        *,
        generator=None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw x_T ~ N(0, prior_std^2 I) of full shape (B, *D) from a generator or noise source."""
        z = as_noise(generator).randn(shape, dtype=dtype, device=device)
        return self.prior_std() * z

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) per example, (B,)."""
        s = self.prior_std()
        d = z[0].numel()
        sq = z.flatten(1).pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * s * s) - sq / (2 * s * s)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients of the linear-Gaussian marginal x_t = alpha(t) x_0 + sigma(t) z, each (B,).

        Derived from `marginal_prob` alone, so it holds for every SDE whose kernel is linear in x_0.
        """
        mean, std = self.marginal_prob(torch.ones_like(t), t)
        return mean, std

    def discretize(
        self, x: torch.Tensor, t: torch.Tensor, dt: float | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward step from t to t + dt: x_{t+dt} = x + f + G * z, z ~ N(0, I).

        Returns (f: (B, *D), G: (B,)). This default is the exact Gaussian transition of a linear
        SDE, derived from the marginal: a = alpha(t+dt) / alpha(t),
        G^2 = sigma(t+dt)^2 - a^2 sigma(t)^2.
        For VP this is the DDPM step with 1 - beta_i = alpha_i^2 / alpha_{i-1}^2; for VE it is the
        SMLD step G^2 = sigma_i^2 - sigma_{i-1}^2. The coefficients are computed in float64.
        """
        t64 = t.double()
        s = t64 + (dt.double() if torch.is_tensor(dt) else float(dt))
        a0, s0 = self.alpha_sigma(t64)
        a1, s1 = self.alpha_sigma(s)
        a = a1 / a0
        g2 = (s1.square() - a.square() * s0.square()).clamp_min(0.0)
        f = append_dims((a - 1).to(x.dtype), x.ndim) * x
        return f, g2.sqrt().to(x.dtype)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (or, with probability_flow=True, the probability-flow ODE)."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """Reverse-time SDE / probability-flow ODE of `forward`, derived from drift, diffusion, score.

    `sde(x, t)` returns the drift and diffusion of the process run backwards in time (dt < 0):
    drift = f - c g^2 score with c = 1 (SDE) or 1/2 (ODE); diffusion = g (SDE) or 0 (ODE).
    `discretize(x, t, dt)` is the reverse of the forward discretisation (the "reverse diffusion"
    step of Song et al. 2021, eq. 46). It returns (rev_f, G') and the step is
    x_{t-dt} = x - rev_f + G' z with rev_f = f - c G^2 score.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool) -> None:
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.T = forward.T

    def _coef(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        drift = f - append_dims(g.square(), x.ndim) * score * self._coef()
        return drift, (torch.zeros_like(g) if self.probability_flow else g)

    def discretize(
        self, x: torch.Tensor, t: torch.Tensor, dt: float | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse step from t to t - dt, using the forward step from t - dt to t."""
        f, G = self.forward.discretize(x, t.double() - dt, dt)
        score = self.score_fn(x, t)
        rev_f = f - append_dims(G.square(), x.ndim) * score * self._coef()
        return rev_f, (torch.zeros_like(G) if self.probability_flow else G)
