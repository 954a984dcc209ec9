"""DPM-Solver++(2M): multistep second-order solver of the probability-flow ODE in log-SNR.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Alg. 2, written for any linear SDE from alpha(t) and sigma(t) (VP, sub-VP and VE alike).
"""

from __future__ import annotations

import math

import torch

from sde_lib import SDE, ScoreFn

from .grids import get_grid, intervals


def sample_dpm_solver(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 19,
    eps: float = 1e-3,
    grid: str = "logsnr",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) from T to eps: x_T (B, *D) -> x_eps (B, *D); one score evaluation per step.

    With lambda = log(alpha / sigma), h_i = lambda_i - lambda_{i-1} and the data prediction
    x0(x, t) = (x + sigma_t^2 score) / alpha_t, each step is
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i (1 - e^{-h_i}) D_i,
    with D_1 = x0_0 (first order) and D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},
    r_i = h_{i-1} / h_i. The default of 19 steps costs 20 evaluations with the final denoising.
    Deterministic: `generator` is unused.
    """
    x0_prev, h_prev = None, None
    for st in intervals(sde, get_grid(grid, sde, steps, eps), progress):
        h = math.log(st.alpha_s / st.sigma_s) - math.log(st.alpha_t / st.sigma_t)
        score = score_fn(x, x.new_full((x.shape[0],), st.t))
        x0 = (x + st.sigma_t**2 * score) / st.alpha_t
        if x0_prev is None:
            d = x0
        else:
            c = h / (2 * h_prev)  # 1 / (2 r_i)
            d = (1 + c) * x0 - c * x0_prev
        x = (st.sigma_s / st.sigma_t) * x - (st.alpha_s * math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
    return x
