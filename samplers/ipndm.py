"""iPNDM: fixed-coefficient Adams-Bashforth on the probability-flow ODE in DDIM's variables.

Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator" (DEIS), the
improved pseudo-numerical method (iPNDM) with its lower-order warm-up; written for any linear SDE
from alpha(t) and sigma(t) alone.
"""

from __future__ import annotations

import torch

from sde_lib import SDE, ScoreFn
from sde_lib.options import FLAG, Number, check_options

from .exponential import step_order
from .grids import get_grid, intervals

# sample_ipndm's options and their allowed values (run.py's validation reads them too)
RULES = {"order": Number(1, 4, integer=True), "lower_order_final": FLAG}

# Adams-Bashforth coefficients of orders 1..4 on the newest-first derivatives
AB_COEFFICIENTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def sample_ipndm(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 19,
    eps: float = 1e-3,
    grid: str = "edm",
    order: int = 4,
    lower_order_final: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """iPNDM from T to eps: x_T (B, *D) -> x_eps (B, *D); one score evaluation per step.

    In x~ = x / alpha and sigma~ = sigma / alpha the flow is dx~ / dsigma~ = e_hat(x, t) with
    e_hat = -sigma_t score(x, t) (DDIM is Euler in these variables). Step i is
        x~_s = x~_t + (sigma~_s - sigma~_t) sum_j c_{p,j} e_hat_{i-j},
    with the Adams-Bashforth coefficients c_p of AB_COEFFICIENTS for p = min(order, i + 1) (the
    warm-up 1 -> 2 -> 3 -> 4) and, with lower_order_final, p <= steps - i. The coefficients are
    those of equal steps whatever the grid: order p on grids uniform in sigma~ (EDM with rho = 1),
    second order on other smooth grids. `steps` NFE (steps + 1 with the final denoising); the
    default 19 steps cost 20. Deterministic: `generator` is unused.
    """
    check_options(RULES, dict(order=order, lower_order_final=lower_order_final))
    batch = (x.shape[0],)
    history: list[torch.Tensor] = []  # e_hat, newest first
    xs = None
    for i, st in enumerate(intervals(sde, get_grid(grid, sde, steps, eps), progress)):
        if xs is None:
            xs = x / st.alpha_t
        e_hat = -st.sigma_t * score_fn(st.alpha_t * xs, x.new_full(batch, st.t))
        history = [e_hat, *history][:order]
        p = step_order(i, steps, order, lower_order_final)
        d = sum(c * e for c, e in zip(AB_COEFFICIENTS[p - 1], history, strict=False))
        xs = xs + (st.sigma_s / st.alpha_s - st.sigma_t / st.alpha_t) * d
    return st.alpha_s * xs
