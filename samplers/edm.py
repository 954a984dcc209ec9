"""EDM's stochastic sampler (Karras et al. 2022, Alg. 2): Heun steps with "churn", for any SDE."""

from __future__ import annotations

import math

import torch

from sde_lib import SDE, ScoreFn, randn_like
from sde_lib.options import Number, check_options

from .grids import get_grid, intervals, t_from_log_snr
from .scaled import heun_step

RULES = {
    "S_churn": Number(lo=0),
    "S_tmin": Number(lo=0),
    "S_tmax": Number(lo=0, none_ok=True),
    "S_noise": Number(lo=0, lo_open=True),
}


def sample_edm(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 18,
    eps: float = 1e-3,
    grid: str = "edm",
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float | None = None,
    S_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """x_T (B, *D) -> x_eps (B, *D) in the scaled variables x~ = x / alpha, s = sigma / alpha,
    where every linear SDE is x~ = x_0 + s z and the flow is dx~ / ds = -s alpha score(x, t).

    At each s_i in [S_tmin, S_tmax] (S_tmax None: no upper limit) the noise is first raised to
    s^ = s_i (1 + gamma), gamma = min(S_churn / steps, sqrt 2 - 1) (and at most up to s(T), where
    the SDE ends), by adding fresh noise of variance s^2 - s_i^2 (times S_noise^2); then a Heun
    step from s^ to
    s_{i+1} (Euler on the last interval, as in EDM). S_churn = 0 is `sample_heun` exactly:
    deterministic, 2 steps - 1 evaluations. The noise is keyed per sample like every sampler's.
    """
    check_options(RULES, dict(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise))
    if S_tmax is not None and S_tmax < S_tmin:
        raise ValueError(f"S_tmax={S_tmax} must be >= S_tmin={S_tmin}")
    s_max = math.inf if S_tmax is None else S_tmax
    alpha_T, sigma_T = (
        float(v) for v in sde.alpha_sigma(torch.tensor([sde.T], dtype=torch.float64))
    )
    s_top = sigma_T / alpha_T
    gamma_max = min(S_churn / steps, math.sqrt(2) - 1)

    xs = None
    for i, st in enumerate(intervals(sde, get_grid(grid, sde, steps, eps), progress)):
        if xs is None:
            xs = x / st.alpha_t
        t, a, sg = st.t, st.alpha_t, st.sigma_t
        s_i = sg / a
        gamma = min(gamma_max, s_top / s_i - 1) if S_tmin <= s_i <= s_max else 0.0
        if gamma > 0:  # churn: raise the noise level to s^ and find its time on the SDE
            s_hat = s_i * (1 + gamma)
            xs = xs + math.sqrt(s_hat**2 - s_i**2) * S_noise * randn_like(xs, generator)
            lam = torch.tensor([-math.log(s_hat)], dtype=torch.float64)
            t = float(t_from_log_snr(sde, lam, sde.T, eps)[0])
            a, sg = (float(v) for v in sde.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
        there = (st.s, st.alpha_s, st.sigma_s)
        xs = heun_step(score_fn, xs, (t, a, sg), there, second_order=i + 1 < steps)
    return st.alpha_s * xs
