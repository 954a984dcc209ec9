"""SDE-DPM-Solver++(3M): the multistep third-order solver of the reverse SDE in log-SNR.

The data-prediction exponential integrator of Lu et al. 2022 with the two previous data
predictions (a quadratic in lambda), in k-diffusion's form with a noise scale eta (eta = 0: the
ODE solver), written for any linear SDE from alpha(t) and sigma(t).
"""

from __future__ import annotations

import math

import torch

from sde_lib import SDE, ScoreFn
from sde_lib.options import Choice, Number, check_options

from .brownian import StepNoise
from .exponential import data_prediction, lam, sde_decay
from .grids import get_grid, intervals

RULES = {"eta": Number(lo=0), "s_noise": Number(lo=0), "brownian": Choice(True, False)}


def sample_dpmpp_3m_sde(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 19,
    eps: float = 1e-3,
    grid: str = "logsnr",
    eta: float = 1.0,
    s_noise: float = 1.0,
    brownian: bool = False,
    generator=None,
    progress: bool = False,
) -> torch.Tensor:
    """x_T (B, *D) -> x_eps (B, *D); one score evaluation per step.

    With h = lambda_s - lambda_t, h_e = (1 + eta) h, phi_2 = (e^(-h_e) - 1) / h_e + 1 and
    phi_3 = phi_2 / h_e - 1/2, each step is
        x_s = (sigma_s / sigma_t) e^(-eta h) x_t
              + alpha_s [(1 - e^(-h_e)) D_t + phi_2 d1 - phi_3 d2]
              + sigma_s sqrt(1 - e^(-2 eta h)) s_noise z,
    where, with r0 = h_1 / h and r1 = h_2 / h (the previous two step sizes),
    d1_0 = (D_t - D_1) / r0, d1_1 = (D_1 - D_2) / r1, d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1),
    d2 = (d1_0 - d1_1) / (r0 + r1): h times the first and h^2 times the second derivative of D in
    lambda. The first step is first order, the second (d1 = d1_0, d2 = 0) second order.
    """
    check_options(RULES, dict(eta=eta, s_noise=s_noise, brownian=brownian))
    ts = get_grid(grid, sde, steps, eps)
    noise = StepNoise.on_grid(x, generator, eta, sde, ts, brownian)
    d_1 = d_2 = h_1 = h_2 = None
    for st in intervals(sde, ts, progress):
        lam_t, lam_s = lam(st.alpha_t, st.sigma_t), lam(st.alpha_s, st.sigma_s)
        h = lam_s - lam_t
        h_e = (1 + eta) * h
        d = data_prediction(score_fn, x, st.t, st.alpha_t, st.sigma_t)
        x_next = sde_decay(st, h, eta) * x
        update = -math.expm1(-h_e) * d
        phi_2 = math.expm1(-h_e) / h_e + 1
        if d_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            update = update + phi_2 * d1 - (phi_2 / h_e - 0.5) * d2
        elif d_1 is not None:
            update = update + phi_2 * (d - d_1) / (h_1 / h)
        x_next = x_next + st.alpha_s * update
        x = noise.add_to(x_next, st.sigma_s, lam_t, lam_s, s_noise)
        d_1, d_2, h_1, h_2 = d, d_1, h, h_1
    return x
