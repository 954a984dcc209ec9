"""Restart sampling (Xu et al. 2023): deterministic Heun steps, with K restarts that add forward
noise from s_min back up to s_max and solve the ODE down again, so that the noise contracts the
error accumulated so far while most steps stay deterministic. Written in the scaled variables
x~ = x / alpha, s = sigma / alpha of any linear SDE (x~ = x_0 + s z, dx~ / ds = -s alpha score).
"""

from __future__ import annotations

import math

import torch

from sde_lib import SDE, ScoreFn, randn_like
from sde_lib.options import Number, check_options

from .grids import get_grid, log_snr, t_from_log_snr
from .scaled import heun_step

RULES = {
    "restart_smin": Number(lo=0, lo_open=True),
    "restart_smax": Number(lo=0, lo_open=True),
    "restart_k": Number(lo=0, integer=True),
    "restart_steps": Number(lo=1, integer=True),
}


def _heun(sde: SDE, score_fn: ScoreFn, xs: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Heun steps of the flow in (x~, s) along `times` (decreasing noise): 2 evaluations each."""
    points = list(zip(times.tolist(), *(v.tolist() for v in sde.alpha_sigma(times.double()))))
    for here, there in zip(points[:-1], points[1:], strict=True):
        xs = heun_step(score_fn, xs, here, there)
    return xs


def sample_restart(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 10,
    eps: float = 1e-3,
    grid: str = "edm",
    restart_smin: float = 0.06,
    restart_smax: float = 0.30,
    restart_k: int = 2,
    restart_steps: int = 3,
    generator=None,
    progress: bool = False,
) -> torch.Tensor:
    """x_T (B, *D) -> x_eps (B, *D).

    Heun on `grid` (steps intervals); at the grid time whose s = sigma / alpha is nearest to
    restart_smin (s_i), restart_k times: x~ += sqrt(s_max^2 - s_i^2) z (the forward process from
    s_i to s_max = restart_smax, z keyed per sample), then `restart_steps` Heun steps on EDM's
    rho = 7 spacing from s_max back to s_i. NFE = 2 steps + restart_k * 2 restart_steps. The
    restart interval is in s units (Xu et al.'s CIFAR-10 setting: [0.06, 0.30], K = 2, 3 steps).
    """
    check_options(RULES, dict(restart_smin=restart_smin, restart_smax=restart_smax,
                              restart_k=restart_k, restart_steps=restart_steps))  # fmt: skip
    if not restart_smin < restart_smax:
        raise ValueError(f"need restart_smin < restart_smax, got {restart_smin}, {restart_smax}")
    ts = get_grid(grid, sde, steps, eps)
    s = (-log_snr(sde, ts)).exp().tolist()
    s_end, s_top = s[-1], s[0]
    if restart_k > 0 and not (s_end < restart_smin and restart_smax < s_top):
        raise ValueError(
            f"the restart interval [{restart_smin}, {restart_smax}] must lie within this SDE's "
            f"noise range s = sigma / alpha in [{s_end:.3g}, {s_top:.3g}]"
        )
    at = min(range(1, len(s)), key=lambda i: abs(math.log(s[i] / restart_smin)))
    alpha_T = float(sde.alpha_sigma(ts[:1].double())[0])
    xs = x / alpha_T
    xs = _heun(sde, score_fn, xs, ts[: at + 1])
    if restart_k > 0:
        s_i = s[at]
        ramp = torch.linspace(0, 1, restart_steps + 1, dtype=torch.float64)
        lo, hi = s_i ** (1 / 7), restart_smax ** (1 / 7)  # EDM's rho = 7 spacing
        noise = (hi + ramp * (lo - hi)) ** 7
        times = t_from_log_snr(sde, -noise.log(), sde.T, eps)
        times[-1] = ts[at]
        for _ in range(int(restart_k)):
            xs = xs + math.sqrt(restart_smax**2 - s_i**2) * randn_like(xs, generator)
            xs = _heun(sde, score_fn, xs, times)
    xs = _heun(sde, score_fn, xs, ts[at:])
    alpha_end = float(sde.alpha_sigma(ts[-1:].double())[0])
    return alpha_end * xs
