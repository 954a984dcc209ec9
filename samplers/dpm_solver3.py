"""DPM-Solver++(3M): multistep third-order data-prediction solver of the probability-flow ODE.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
multistep variant of order 3, written for any linear SDE from alpha(t), sigma(t) and
lambda = log(alpha / sigma) alone (VP, sub-VP and VE alike).
"""

from __future__ import annotations

import torch

from sde_lib import SDE, ScoreFn
from sde_lib.options import FLAG, Number, check_options

from .exponential import (
    data_prediction,
    exp_weights,
    lam,
    step_h,
    step_order,
)
from .grids import get_grid, intervals

# sample_dpm_solver3's options and their allowed values (run.py's validation reads them too)
RULES = {"order": Number(1, 3, integer=True), "lower_order_final": FLAG}


def sample_dpm_solver3(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 19,
    eps: float = 1e-3,
    grid: str = "logsnr",
    order: int = 3,
    lower_order_final: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(3M) from T to eps: x_T (B, *D) -> x_eps (B, *D).

    One score evaluation per step (`steps` NFE; with the final denoising of `sample`, steps + 1,
    so the default 19 steps cost 20). Step i evaluates the data prediction x0_i at its start and
    integrates exactly the polynomial in lambda through the last p of them (p = min(order, i + 1):
    the warm-up 1 -> 2 -> 3; with lower_order_final also p <= steps - i, so the last step is first
    order, which keeps <= 10-step runs stable near t = 0):
        x_s = (sigma_s / sigma_t) x_t + alpha_s sum_j w_j x0_{i-j},
    with w_j the exponential-integrator weights of `exponential.exp_weights` at the nodes
    lambda_{i-j} - lambda_i. For p = 3 these are DPM-Solver++(3M)'s phi_1, phi_2, phi_3 terms with
    its divided-difference estimates of the first two lambda-derivatives of x0. Global order p on
    any grid. Deterministic: `generator` is unused.
    """
    check_options(RULES, dict(order=order, lower_order_final=lower_order_final))
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, x0), newest first
    for i, st in enumerate(intervals(sde, get_grid(grid, sde, steps, eps), progress)):
        lam_t = lam(st.alpha_t, st.sigma_t)
        x0 = data_prediction(score_fn, x, st.t, st.alpha_t, st.sigma_t)
        history = [(lam_t, x0), *history][:order]
        p = step_order(i, steps, order, lower_order_final)
        weights = exp_weights([lj - lam_t for lj, _ in history[:p]], step_h(st))
        x = (st.sigma_s / st.sigma_t) * x
        for w, (_, m) in zip(weights, history, strict=False):
            x = x + (st.alpha_s * w) * m
    return x
