"""Variational Diffusion Models: a variance-preserving SDE with a learned log-SNR schedule.

Kingma, Salimans, Poole & Ho 2021 (VDM). The marginal is x_t = alpha_t x_0 + sigma_t z with
    alpha_t^2 = sigmoid(-gamma(t)),   sigma_t^2 = sigmoid(gamma(t)),
so alpha^2 + sigma^2 = 1 and gamma(t) = log(sigma_t^2 / alpha_t^2) is the negative log-SNR. The
schedule is
    gamma(t) = gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0)),
with g a monotone network l1(t) + l3(sigmoid(l2(l1(t)))) whose linear layers have positive weights
(softplus of free parameters), so g and gamma increase in t whatever the parameters; gamma_0 and
gamma_1 (`gamma_min`, `gamma_max`) are learned too unless `learn_endpoints=False`.
`schedule="linear"` is the fixed gamma(t) = gamma_0 + (gamma_1 - gamma_0) t.

As an SDE it is derived from the marginal alone: d log alpha^2 / dt = -sigma^2 gamma'(t), so
    f(x, t) = -1/2 gamma'(t) sigma_t^2 x,   g(t)^2 = gamma'(t) sigma_t^2
(the VP SDE with beta(t) = gamma'(t) sigma_t^2). gamma' is in closed form (chain rule through the
three layers), so it is also available under torch.no_grad in the samplers.

The schedule's parameters are an nn.Module (`module`), which the score model owns
(`models.score.ScoreModel` registers it), so the optimiser, EMA, DDP and checkpoints hold it with
the network. The network is conditioned on `net_time(t)`, the normalised gamma(t).

Training the schedule (VDM App. I.2): the continuous VLB depends on the schedule only through its
end points, but the variance of its Monte Carlo estimator depends on the shape. Inside
`variance_gradient(n)` every shape evaluation for a batch of n times gets a gradient hook that
multiplies its incoming gradient by a per-row factor set later (2 L_diff), turning the gradient of
L into that of L^2 for the shape parameters only (E[L] does not depend on them, so minimising
E[L^2] minimises the variance); the end points and the network keep the gradient of the bound.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import SDE, append_dims

SCHEDULES = ("learned", "linear")


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class _GradScale:
    """Per-row gradient factors for the schedule's shape, set once the loss is known."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.scale: torch.Tensor | None = None

    def hook(self, grad: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("variance_gradient: backward before the gradient scale was set")
        return grad * self.scale.to(grad)


class GammaSchedule(nn.Module):
    """gamma(t) and gamma'(t), each (B,), in the dtype and on the device of t."""

    def __init__(
        self,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        learn_endpoints: bool = True,
        schedule: str = "learned",
        hidden: int = 1024,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min} and {gamma_max}")
        self.kind = schedule
        ends = torch.tensor([float(gamma_min), float(gamma_max)])
        if learn_endpoints:
            self.ends = nn.Parameter(ends)
        else:
            self.register_buffer("ends", ends)
        if schedule == "learned":
            # a fixed generator: the initial schedule does not depend on the global seed
            gen = torch.Generator().manual_seed(0x6D6F6E6F)
            self.w1 = nn.Parameter(torch.tensor(_inv_softplus(1.0)))
            self.b1 = nn.Parameter(torch.zeros(()))
            # l2: 1 -> hidden, l3: hidden -> 1: sigmoids of slopes ~2 spread over t, weighted
            # about as much as the linear part, so the shape has room to move from the start
            self.w2 = nn.Parameter(torch.randn(hidden, generator=gen) + 1.5)
            self.b2 = nn.Parameter(torch.randn(hidden, generator=gen) * 2.0 - 1.0)
            self.w3 = nn.Parameter(torch.randn(hidden, generator=gen) * 0.5)
        self._scales: list[_GradScale] = []

    # ------------------------------------------------------------------ the monotone network

    def _g(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g(t) and g'(t) for t (N,), written with elementwise products so that float64 t and
        float32 weights promote (no matmul)."""
        w1, w2, w3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3)
        h = w1 * t + self.b1  # l1(t): (N,)
        a = torch.sigmoid(h[:, None] * w2 + self.b2)  # (N, hidden)
        n = w2.shape[0]
        g = h + (a * w3).sum(-1) / n
        dg = w1 * (1 + (a * (1 - a) * w2 * w3).sum(-1) / n)
        return g, dg

    def shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised shape s(t) = (g(t) - g(0)) / (g(1) - g(0)) in [0, 1] and s'(t)."""
        if self.kind == "linear":
            return t, torch.ones_like(t)
        ends = torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device)
        g, dg = self._g(torch.cat([t, ends]))
        g0, g1 = g[-2], g[-1]
        span = g1 - g0
        s, ds = (g[:-2] - g0) / span, dg[:-2] / span
        for holder in self._scales:
            if s.requires_grad and s.shape[0] == holder.rows:
                s.register_hook(holder.hook)
                ds.register_hook(holder.hook)
        return s, ds

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)) for t (B,) in [0, 1]."""
        device = self.ends.device
        tt = t.reshape(-1).to(device)
        s, ds = self.shape(tt)
        g0, g1 = self.ends[0], self.ends[1]
        gamma = g0 + (g1 - g0) * s
        dgamma = (g1 - g0) * ds
        return gamma.to(t.device).reshape(t.shape), dgamma.to(t.device).reshape(t.shape)

    @contextlib.contextmanager
    def variance_gradient(self, rows: int):
        """Inside: the shape's gradient for batches of `rows` times is scaled per row by the
        holder's `scale` (set it before backward): see the module docstring."""
        holder = _GradScale(rows)
        self._scales.append(holder)
        try:
            yield holder
        finally:
            self._scales.remove(holder)


PRIOR_KL_PER_DIM = 1e-4  # nats: the prior term `endpoints_from_data` leaves


def endpoints_from_data(
    levels: int | None, data_range: tuple[float, float], second_moment: float
) -> tuple[float, float]:
    """(gamma_0, gamma_1) fitted to the data instead of CIFAR-10's (-13.3, 5).

    gamma_0: the decoder's noise std e^(gamma_0 / 2) one sixth of the spacing of the data's levels
    (delta = (hi - lo) / (L - 1)), so that the discretised decoder recovers the level with
    probability 1 - 2 Phi(-3) = 0.997 per dimension while the bound does not spend its diffusion
    term on noise levels far below the quantisation. For 8-bit data on [-1, 1] this is -13.27,
    VDM's own CIFAR-10 value; for digits' 17 levels, -7.7. Continuous data (levels None): -13.3.
    gamma_1: the prior KL(q(z_1 | x) || N(0, I)) = 1/2 (alpha^2 m2 - alpha^2 - log(1 - alpha^2))
    per dimension ~ 1/2 alpha_1^2 m2 (m2 = E[x_i^2]) at most PRIOR_KL_PER_DIM.
    """
    lo, hi = data_range
    gamma_0 = -13.3 if levels is None else 2 * math.log((hi - lo) / (levels - 1) / 6)
    alpha2 = 2 * PRIOR_KL_PER_DIM / max(float(second_moment), 1e-3)
    gamma_1 = math.log((1 - alpha2) / alpha2)
    return gamma_0, max(gamma_1, gamma_0 + 1)


class VDMSDE(SDE):
    """The VP SDE with alpha^2 = sigmoid(-gamma(t)), sigma^2 = sigmoid(gamma(t)) (module doc)."""

    def __init__(
        self,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        learn_endpoints: bool = True,
        schedule: str = "learned",
    ) -> None:
        if not isinstance(learn_endpoints, bool):
            raise ValueError(f"learn_endpoints must be true or false, got {learn_endpoints!r}")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.learn_endpoints = learn_endpoints
        self.schedule = GammaSchedule(gamma_min, gamma_max, learn_endpoints, schedule)

    @property
    def module(self) -> nn.Module:
        """The schedule's parameters, to be trained and saved with the score model."""
        return self.schedule

    @property
    def learnable(self) -> bool:
        return any(p.requires_grad for p in self.schedule.parameters())

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule(t)[0]

    def gamma_and_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)), each (B,)."""
        return self.schedule(t)

    def net_time(self, t: torch.Tensor, alpha=None, sigma=None) -> torch.Tensor:
        """What the network is conditioned on: gamma(t) normalised by the initial end points
        (0 at gamma_min, 1 at gamma_max; fixed numbers, so learning the end points does not
        rescale the network's input). With alpha(t), sigma(t) already at hand, gamma =
        log(sigma^2 / alpha^2) is read off them instead of evaluating the schedule again."""
        gamma = self.gamma(t) if alpha is None else 2 * (sigma.log() - alpha.log())
        return (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)

    def sde(self, x, t):
        gamma, dgamma = self.schedule(t)
        beta = dgamma * torch.sigmoid(gamma)
        return -0.5 * append_dims(beta.to(x.dtype), x.ndim) * x, beta.sqrt().to(x.dtype)

    def marginal_prob(self, x, t):
        gamma = self.gamma(t)
        alpha = torch.sigmoid(-gamma).sqrt()
        sigma = torch.sigmoid(gamma).sqrt()
        return append_dims(alpha.to(x.dtype), x.ndim) * x, sigma

    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return (
            f"VDMSDE(gamma_min={self.gamma_min}, gamma_max={self.gamma_max}, "
            f"learn_endpoints={self.learn_endpoints}, schedule={self.schedule.kind!r})"
        )
