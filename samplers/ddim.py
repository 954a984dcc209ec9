"""DDIM (Song, Meng & Ermon 2021, eq. 12), written for any linear SDE from alpha(t) and sigma(t)."""

from __future__ import annotations

import torch

from sde_lib import SDE, ScoreFn, randn_like
from sde_lib.options import Number, check_options

from .grids import Step, get_grid, intervals

# sample_ddim's options and their allowed values (run.py's validation reads them too)
RULES = {"eta": Number(lo=0)}


def decaying_alpha(sde: SDE) -> str | None:
    """None if the SDE's mean coefficient decays (alpha(T) < 1: VP, sub-VP); else what is needed."""
    alpha_T, _ = sde.alpha_sigma(torch.tensor([sde.T], dtype=torch.float64))
    if alpha_T.item() < 1:
        return None
    return f"a variance-preserving SDE (sde=vp or sde=subvp); got {type(sde).__name__}"


def sample_ddim(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 50,
    eps: float = 1e-3,
    eta: float = 0.0,
    grid: str = "quadratic",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampler: x_T (B, *D) -> x_eps (B, *D); eta = 0 is deterministic, eta = 1 ancestral.

    For each interval t -> s of the grid, with x0 = (x + sigma_t^2 score) / alpha_t (Tweedie) and
    eps_hat = (x - alpha_t x0) / sigma_t = -sigma_t score:
        x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z,
        c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2).
    One score evaluation per step (steps + 1 NFE with the final denoising). The default
    time-quadratic grid is the best measured at 50 steps on VP and sub-VP (docs/samplers.md;
    uniform-t is the worst).
    """
    check_options(RULES, dict(eta=eta))
    for st in intervals(sde, get_grid(grid, sde, steps, eps), progress):
        x = ddim_step(x, score_fn(x, x.new_full((x.shape[0],), st.t)), st, eta, generator)
    return x


def ddim_step(
    x: torch.Tensor, score: torch.Tensor, st: Step, eta: float, generator, noise_free: bool = False
) -> torch.Tensor:
    """One DDIM step t -> s (eq. 12) from the score at (x, t); noise_free=True returns its mean."""
    ratio = st.alpha_t * st.sigma_s / (st.alpha_s * st.sigma_t)
    c = eta * st.sigma_s * max(1 - ratio**2, 0.0) ** 0.5
    x0 = (x + st.sigma_t**2 * score) / st.alpha_t
    out = st.alpha_s * x0 - (max(st.sigma_s**2 - c**2, 0.0) ** 0.5 * st.sigma_t) * score
    if c > 0 and not noise_free:
        out = out + c * randn_like(x, generator)
    return out
