"""UniPC: unified predictor-corrector solver of the probability-flow ODE (data prediction).

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models": the predictor UniP-p and the corrector UniC-p, written for any linear SDE from alpha(t),
sigma(t) and lambda = log(alpha / sigma) alone (VP, sub-VP and VE alike).
"""

from __future__ import annotations

import math

import torch

from sde_lib import SDE, ScoreFn
from sde_lib.options import FLAG, Choice, Number, check_options

from .exponential import (
    data_prediction,
    lam,
    phi,
    step_h,
    step_order,
)
from .grids import get_grid, intervals

VARIANTS = ("bh1", "bh2")
# sample_unipc's options and their allowed values (run.py's validation reads them too)
RULES = {
    "order": Number(1, 3, integer=True),
    "variant": Choice(*VARIANTS),
    "use_corrector": FLAG,
    "lower_order_final": FLAG,
}


def b_of_h(variant: str, h: float) -> float:
    """B(h): h for bh1, e^h - 1 for bh2 (in data prediction, with lambda increasing, 1 - e^{-h})."""
    return h if variant == "bh1" else -math.expm1(-h)


def unipc_coefficients(rs: list[float], h: float, variant: str) -> list[float]:
    """a solving sum_m a_m r_m^{k-1} = k! h phi_{k+1}(-h) / B(h), k = 1..len(rs).

    A single unknown takes a_1 = 1/2 (the h -> 0 limit, as in Zhao et al.), where B(h) matters;
    larger systems are solved exactly and B(h) cancels from the update.
    """
    n = len(rs)
    if n == 0:
        return []
    if n == 1:
        return [0.5]
    b = b_of_h(variant, h)
    R = torch.tensor([[r ** (k - 1) for r in rs] for k in range(1, n + 1)], dtype=torch.float64)
    g = torch.tensor(
        [math.factorial(k) * h * phi(k + 1, h) / b for k in range(1, n + 1)], dtype=torch.float64
    )
    return torch.linalg.solve(R, g).tolist()


def sample_unipc(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 19,
    eps: float = 1e-3,
    grid: str = "logsnr",
    order: int = 3,
    variant: str = "bh2",
    use_corrector: bool = True,
    lower_order_final: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """UniPC from T to eps: x_T (B, *D) -> x_eps (B, *D); one score evaluation per step.

    With m_j the data predictions x0 at the grid points (newest m_0 at t), h = lambda_s - lambda_t,
    r_j = (lambda_j - lambda_t) / h and D_j = m_j - m_0, the predictor UniP-p is
        x~_s = (sigma_s / sigma_t) x_t + alpha_s [(1 - e^{-h}) m_0 + B(h) sum_j a_j D_j / r_j]
    over the p - 1 previous points (a from `unipc_coefficients`). The model is then evaluated at
    x~_s: m_s = x0(x~_s, s). The corrector UniC-p redoes the update with the p - 1 previous points
    and the new one (r = 1, D = m_s - m_0), giving x_s of one order higher; m_s is kept for the
    next step, so the corrector costs no evaluation. It is skipped after the last step, which
    would need one. p = min(order, i + 1) (warm-up) and, with lower_order_final, p <= steps - i.
    Order p with use_corrector=False, p + 1 with it (once past the warm-up). `steps` NFE (steps + 1
    with the final denoising): the default 19 steps cost 20. `generator` is unused.
    """
    check_options(
        RULES,
        dict(
            order=order,
            variant=variant,
            use_corrector=use_corrector,
            lower_order_final=lower_order_final,
        ),
    )
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, x0), newest first
    for i, st in enumerate(intervals(sde, get_grid(grid, sde, steps, eps), progress)):
        lam_t, h = lam(st.alpha_t, st.sigma_t), step_h(st)
        if i == 0:
            history = [(lam_t, data_prediction(score_fn, x, st.t, st.alpha_t, st.sigma_t))]
        p = step_order(i, steps, order, lower_order_final)
        m0 = history[0][1]
        prev = history[1:p]
        rs = [(lj - lam_t) / h for lj, _ in prev]
        ds = [m - m0 for _, m in prev]
        base = (st.sigma_s / st.sigma_t) * x + (st.alpha_s * -math.expm1(-h)) * m0
        bh = st.alpha_s * b_of_h(variant, h)
        x_pred = base
        for a, r, d in zip(unipc_coefficients(rs, h, variant), rs, ds, strict=True):
            x_pred = x_pred + (bh * a / r) * d
        if i + 1 == steps:
            x = x_pred
            break
        m_new = data_prediction(score_fn, x_pred, st.s, st.alpha_s, st.sigma_s)
        if use_corrector:
            x = base
            for a, r, d in zip(
                unipc_coefficients([*rs, 1.0], h, variant),
                [*rs, 1.0],
                [*ds, m_new - m0],
                strict=True,
            ):
                x = x + (bh * a / r) * d
        else:
            x = x_pred
        history = [(lam(st.alpha_s, st.sigma_s), m_new), *history][:order]
    return x
