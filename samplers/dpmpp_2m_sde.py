"""SDE-DPM-Solver++(2M): the multistep second-order solver of the reverse SDE in log-SNR.

Lu et al. 2022, "DPM-Solver++" (the SDE variant of Sec. 5 / App.), in k-diffusion's form with a
noise scale eta (eta = 0: the ODE solver DPM-Solver++(2M); eta = 1: the reverse SDE), written for
any linear SDE from alpha(t) and sigma(t).
"""

from __future__ import annotations

import math

import torch

from sde_lib import SDE, ScoreFn
from sde_lib.options import Choice, Number, check_options

from .brownian import StepNoise
from .exponential import data_prediction, lam, sde_decay
from .grids import get_grid, intervals

RULES = {
    "eta": Number(lo=0),
    "s_noise": Number(lo=0),
    "solver_type": Choice("midpoint", "heun"),
    "brownian": Choice(True, False),
}


def sample_dpmpp_2m_sde(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 19,
    eps: float = 1e-3,
    grid: str = "logsnr",
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    brownian: bool = False,
    generator=None,
    progress: bool = False,
) -> torch.Tensor:
    """x_T (B, *D) -> x_eps (B, *D); one score evaluation per step.

    With lambda = log(alpha / sigma), h = lambda_s - lambda_t, h_e = (1 + eta) h and the data
    prediction D_t = x0(x_t, t), each step from t to s is
        x_s = (sigma_s / sigma_t) e^(-eta h) x_t + alpha_s (1 - e^(-h_e)) D_t
              + alpha_s c (D_t - D_prev) / r                              (r = h_prev / h)
              + sigma_s sqrt(1 - e^(-2 eta h)) s_noise z,
    c = (1 - e^(-h_e)) / 2 (midpoint) or 1 - (1 - e^(-h_e)) / h_e (heun); the first step is
    first order. brownian: z from one Brownian path per sample (`brownian.StepNoise`), so that
    other step counts refine the same path.
    """
    check_options(RULES, dict(eta=eta, s_noise=s_noise, solver_type=solver_type, brownian=brownian))
    ts = get_grid(grid, sde, steps, eps)
    noise = StepNoise.on_grid(x, generator, eta, sde, ts, brownian)
    d_prev, h_prev = None, None
    for st in intervals(sde, ts, progress):
        lam_t, lam_s = lam(st.alpha_t, st.sigma_t), lam(st.alpha_s, st.sigma_s)
        h = lam_s - lam_t
        h_e = (1 + eta) * h
        d = data_prediction(score_fn, x, st.t, st.alpha_t, st.sigma_t)
        phi = -math.expm1(-h_e)
        x_next = sde_decay(st, h, eta) * x + st.alpha_s * phi * d
        if d_prev is not None:
            c = 0.5 * phi if solver_type == "midpoint" else -phi / h_e + 1
            x_next = x_next + (st.alpha_s * c * h / h_prev) * (d - d_prev)
        x = noise.add_to(x_next, st.sigma_s, lam_t, lam_s, s_noise)
        d_prev, h_prev = d, h
    return x
