"""The probability-flow ODE: sampling, sampling with each sample's log-density, and latent
encoding / decoding.

dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)   (Song et al. 2021, eq. 13)

Run from T down to eps it maps prior draws to data (`sample_ode`, `decode`); run from eps up to T it
maps data to latents (`encode`). Adaptive methods take rtol / atol: "dopri5" and "bosh3" solve
each sample with its own step size (`sde_lib.rk`; per_point=False: torchdiffeq's one step size
per batch, under which a sample moves with its batch-mates by about the tolerance), the others
are torchdiffeq's; fixed-step methods ("euler", "midpoint", "rk4", ...) step on a float64 time
grid of `steps` intervals.
"""

from __future__ import annotations

import torch
from torchdiffeq import odeint
from tqdm.auto import tqdm

from sde_lib import SDE, ScoreFn
from sde_lib.options import Choice, Number, check_options
from sde_lib.rk import TABLEAUS, solve_per_point

from .grids import get_grid

FIXED_METHODS = ("euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# sample_ode's options and their allowed values (run.py's validation reads them too)
RULES = {
    "method": Choice(*ADAPTIVE_METHODS, *FIXED_METHODS),
    "rtol": Number(lo=0, lo_open=True),
    "atol": Number(lo=0, lo_open=True),
}


def solve_flow(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    to_data: bool = True,
    eps: float = 1e-3,
    steps: int | None = None,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grid: str = "uniform",
    per_point: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the probability-flow ODE between T and eps: x (B, *D) -> (B, *D).

    to_data=True runs from T down to eps (decoding), False from eps up to T (encoding).
    Fixed-step methods need `steps` and step on `grid`, traversed in the direction of integration;
    adaptive methods take no `steps`. Score evaluations: one per drift evaluation (per point,
    for the per-point solvers: a batch evaluation then holds only the unfinished samples).
    """
    if method in TABLEAUS and per_point:
        if steps is not None:
            raise ValueError(f"steps={steps!r} has no effect with the adaptive method {method!r}")
        check_options(RULES, dict(rtol=rtol, atol=atol))
        rev = sde.reverse(score_fn, probability_flow=True)
        bar = _bar(progress)

        def rows_drift(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            if bar is not None:
                bar.update()
            return rev.sde(y.reshape(-1, *x.shape[1:]), t)[0].reshape(y.shape)

        span = (sde.T, eps) if to_data else (eps, sde.T)
        try:
            sol = solve_per_point(
                rows_drift, x.reshape(x.shape[0], -1), *span, method=method, rtol=rtol, atol=atol
            )
        finally:
            if bar is not None:
                bar.close()
        return sol.y1.reshape(x.shape)
    if method in ADAPTIVE_METHODS:
        if steps is not None:
            raise ValueError(
                f"steps={steps!r} has no effect with the adaptive method {method!r}; leave steps "
                f"unset or choose a fixed-step method: {', '.join(FIXED_METHODS)}"
            )
        check_options(RULES, dict(rtol=rtol, atol=atol))
        # Land exactly on the end point: dopri5 and its kin would otherwise step past it and
        # evaluate the score outside [eps, T], where alpha and sigma may be undefined.
        end = torch.tensor([eps if to_data else sde.T], dtype=torch.float64, device=x.device)
        options = {"step_t": end}  # a tensor, so that torchdiffeq flips it for t0 > t1
    elif method in FIXED_METHODS:
        if steps is None:
            raise ValueError(f"the fixed-step method {method!r} needs steps (an integer >= 1)")
        ts = get_grid(grid, sde, steps, eps).to(x.device)
        ts = ts if to_data else ts.flip(0)
        options = {"grid_constructor": lambda func, y0, t: ts}
    else:
        RULES["method"].check("method", method)
    rev = sde.reverse(score_fn, probability_flow=True)
    batch = (x.shape[0],)
    bar = _bar(progress)

    def drift(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if bar is not None:
            bar.update()
        # the first-step probe of the adaptive solvers may lie outside [eps, T] (see
        # likelihood.ode); no step does
        return rev.sde(y, t.clamp(eps, sde.T).expand(batch))[0]

    ends = [sde.T, eps] if to_data else [eps, sde.T]
    span = torch.tensor(ends, dtype=torch.float64, device=x.device)
    try:
        out = odeint(drift, x, span, rtol=rtol, atol=atol, method=method, options=options)
    finally:
        if bar is not None:
            bar.close()
    return out[-1]


def sample_ode(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int | None = None,
    eps: float = 1e-3,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grid: str = "uniform",
    per_point: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Probability-flow ODE sampler (Song et al. 2021, Sec. 4.3): x_T (B, *D) -> x_eps (B, *D).

    Deterministic: `generator` is unused. Adaptive methods take no `steps`. per_point: dopri5 and
    bosh3 control each sample's steps on their own (a sample does not depend on its batch).
    `likelihood.sample_log_density` also returns each sample's model log-density.
    """
    return solve_flow(
        sde,
        score_fn,
        x,
        to_data=True,
        eps=eps,
        steps=steps,
        method=method,
        rtol=rtol,
        atol=atol,
        grid=grid,
        per_point=per_point,
        progress=progress,
    )


def _bar(progress: bool):
    if not progress:
        return None

    return tqdm(desc="ODE drift evaluations")
