"""Programmatic entry points: `sample`, `encode`, `decode`, the sampler registry and its checks.

A sampler is a plain function with one shared signature,

    fn(sde, score_fn, x_T, *, steps=<its default>, eps, generator, progress, **its options) -> x_eps

registered by name in SAMPLERS. Its own keyword options and defaults are read from its signature, so
adding a sampler is one file plus one line here. `sample` draws x_T from the prior, runs the sampler
to t = eps, optionally denoises with Tweedie's formula and counts score evaluations (NFE). A
sampler that takes a `denoise` keyword as well is handed that flag and spends the final evaluation
itself (sampler=fast, whose measured final-step policy may be one more solver step).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch

from sde_lib import SDE, ScoreFn
from sde_lib.options import OptionError
from sde_lib.options import check_options as check_options_of

from . import (
    ddim,
    dpm_solver3,
    dpmpp_2m_sde,
    dpmpp_3m_sde,
    edm,
    fast,
    ipndm,
    ode,
    pc,
    restart,
    unipc,
)
from .ddim import decaying_alpha, sample_ddim
from .dpm_solver import sample_dpm_solver
from .dpm_solver3 import sample_dpm_solver3
from .dpmpp_2m_sde import sample_dpmpp_2m_sde
from .dpmpp_3m_sde import sample_dpmpp_3m_sde
from .edm import sample_edm
from .exponential import tweedie_denoise
from .fast import sample_fast
from .heun import sample_heun
from .ipndm import sample_ipndm
from .ode import sample_ode, solve_flow
from .optimise_grid import check_fittable, optimise_grid
from .pc import sample_ancestral, sample_em, sample_pc, sample_reverse_diffusion
from .restart import sample_restart
from .unipc import sample_unipc

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "em": sample_em,
    "reverse_diffusion": sample_reverse_diffusion,
    "ancestral": sample_ancestral,
    "pc": sample_pc,
    "ode": sample_ode,
    "ddim": sample_ddim,
    "dpm_solver": sample_dpm_solver,
    "fast": sample_fast,
    "heun": sample_heun,
    "edm": sample_edm,
    "dpm_solver3": sample_dpm_solver3,
    "unipc": sample_unipc,
    "ipndm": sample_ipndm,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "restart": sample_restart,
}

# name -> the allowed values of its options, owned by the sampler's module (grid is checked by
# grids.get_grid, which knows the SDE and the step count)
RULES: dict[str, dict] = {
    "ancestral": pc.ANCESTRAL_RULES,
    "pc": pc.PC_RULES,
    "ode": ode.RULES,
    "ddim": ddim.RULES,
    "fast": fast.RULES,
    "dpm_solver3": dpm_solver3.RULES,
    "unipc": unipc.RULES,
    "ipndm": ipndm.RULES,
    "edm": edm.RULES,
    "dpmpp_2m_sde": dpmpp_2m_sde.RULES,
    "dpmpp_3m_sde": dpmpp_3m_sde.RULES,
    "restart": restart.RULES,
}

# name -> check(sde) returning None when the sampler applies, else what it needs
REQUIREMENTS: dict[str, Callable[[SDE], str | None]] = {"ddim": decaying_alpha}

_SHARED = ("steps", "eps", "generator", "progress", "denoise")


class CountingScore:
    """Wrap score_fn(x, t) and count its calls in `nfe` (one call = one batched evaluation)."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn = score_fn
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.score_fn(x, t)


def sampler_options(name: str) -> dict[str, Any]:
    """The sampler's own keyword options and their defaults, including `steps`."""
    fn = _lookup(name)
    params = inspect.signature(fn).parameters.values()
    own = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    return {k: v for k, v in own.items() if k == "steps" or k not in _SHARED}


def check_options(name: str, options: dict, prefix: str = "") -> None:
    """Raise OptionError (a ValueError) for an option `name` does not take or a value its rule
    does not allow; the message names prefix + key."""
    allowed = sampler_options(name)
    for key in options:
        if key not in allowed:
            names = ", ".join(k for k in allowed if k != "steps") or "none"
            raise OptionError(f"{prefix}{key} is not an option of sampler {name}; allowed: {names}")
    check_options_of(RULES.get(name, {}), options, prefix)


def check_applicable(name: str, sde: SDE) -> None:
    """Raise ValueError if sampler `name` is unknown or does not apply to `sde`."""
    _lookup(name)
    check = REQUIREMENTS.get(name)
    reason = check(sde) if check is not None else None
    if reason is not None:
        raise ValueError(f"sampler {name!r} needs {reason}; use sampler=ode or sampler=fast")


def sample(
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    sampler: str = "pc",
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    eps: float = 1e-3,
    denoise: bool = True,
    x_T: torch.Tensor | None = None,
    progress: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, int]:
    """Draw samples of full shape (B, *D) with the named sampler: returns (x_0: (B, *D), nfe).

    steps=None takes the sampler's default (see `sampler_options`). x_T, if given, replaces the
    prior draw and must have the given shape. With denoise=True the result is Tweedie's estimate
    E[x_0 | x_eps] (one more score evaluation). Runs without autograd. grid="fit" (for the
    deterministic solvers of samplers.optimise_grid.FITTABLE) first fits the time steps to
    score_fn's own flow on a fixed calibration batch (`optimise_grid.fit_schedule`); its score
    evaluations are not in the returned NFE, and every call fits again: to sample many batches,
    fit once with fit_schedule and pass the times as grid.
    """
    fn = _lookup(sampler)
    check_applicable(sampler, sde)
    check_options(sampler, options)
    _check_eps(eps, sde)
    if denoise is not True and denoise is not False:
        raise ValueError(f"denoise must be True or False, got {denoise!r}")
    if steps is not None:
        options["steps"] = steps
    if x_T is None:
        x = sde.prior_sampling(tuple(shape), generator=generator, device=device)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    else:
        x = x_T
    if isinstance(options.get("grid"), str) and options["grid"] == "fit":
        n = options.get("steps", sampler_options(sampler).get("steps"))
        try:
            options["grid"], _ = fit_schedule(
                sde,
                score_fn,
                tuple(shape[1:]),
                sampler,
                n,
                eps=eps,
                denoise=denoise,
                options=options,
                device=x.device,
            )
        except ValueError as e:
            raise ValueError(f"grid='fit': {e}") from None
    counted = CountingScore(score_fn)
    # a sampler with a `denoise` keyword spends the final evaluation itself (sampler=fast may
    # spend it on one more solver step instead of Tweedie's formula); NFE is the same
    own_final = "denoise" in inspect.signature(fn).parameters
    if own_final:
        options["denoise"] = denoise
    with torch.no_grad():
        x = fn(sde, counted, x, eps=eps, generator=generator, progress=progress, **options)
        if denoise and not own_final:
            x = tweedie_denoise(sde, counted, x, eps)
    return x, counted.nfe


def fit_schedule(
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    sampler: str,
    steps: int,
    *,
    eps: float = 1e-3,
    denoise: bool = True,
    options: dict | None = None,
    batch: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compare_default: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Times (steps + 1,) fitted for the named sampler (with its options) to score_fn's own flow.
    compare_default=True also scores the sampler on its own default grid (its whole default
    run, final evaluation included) on the same batch: info["mse_compare"]["default"].

    shape: one sample's shape (D,) or (C, H, W). The calibration batch is `batch` prior draws
    (default 1000 points, 256 images) from a generator seeded with `seed`, so a fit is
    reproducible and independent of the noise it is later used with, on `device` in `dtype`
    (default: the prior's). This is `grid="fit"` of `samplers.sample`, `sampler.grid=fit` of
    run.py and the fit of the command line below.
    """
    options = {k: v for k, v in (options or {}).items() if k not in ("grid", "steps")}
    check_fittable(sampler, options, steps)
    n = batch or (1000 if len(shape) == 1 else 256)
    x_T = sde.prior_sampling((n, *shape), generator=torch.Generator().manual_seed(seed))
    x_T = x_T.to(device=device, dtype=dtype or x_T.dtype)
    fn = _lookup(sampler)

    def default_run(x: torch.Tensor) -> torch.Tensor:
        y = fn(sde, score_fn, x, steps=steps, eps=eps, **options, **fast_final(sampler, denoise))
        return tweedie_denoise(sde, score_fn, y, eps) if denoise and sampler != "fast" else y

    compare = {"default": default_run} if compare_default else None
    return optimise_grid(
        sde, score_fn, x_T, fn, steps, eps=eps, denoise=denoise, options=options, compare=compare
    )


def fast_final(sampler: str, denoise: bool) -> dict:
    """`fast` spends its final evaluation itself (Tweedie's step or one more solver step, by its
    measured policy) when told denoise=True; the others leave it to the caller."""
    return {"denoise": denoise} if sampler == "fast" else {}


def encode(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    eps: float = 1e-3,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    grid: str = "uniform",
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Latent code of x, taken at t = eps: the probability-flow ODE from eps to T.

    x, z: (B, *D). Returns (z, nfe). Options as in `sample_ode`. Runs without autograd.
    """
    return _flow(sde, score_fn, x, False, eps, method, rtol, atol, steps, grid, progress)


def decode(
    sde: SDE,
    score_fn: ScoreFn,
    z: torch.Tensor,
    *,
    eps: float = 1e-3,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    grid: str = "uniform",
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Inverse of `encode`: the probability-flow ODE from T to eps, no denoising: (x, nfe)."""
    return _flow(sde, score_fn, z, True, eps, method, rtol, atol, steps, grid, progress)


def _flow(sde, score_fn, x, to_data, eps, method, rtol, atol, steps, grid, progress):
    _check_eps(eps, sde)
    counted = CountingScore(score_fn)
    with torch.no_grad():
        out = solve_flow(
            sde,
            counted,
            x,
            to_data=to_data,
            eps=eps,
            steps=steps,
            method=method,
            rtol=rtol,
            atol=atol,
            grid=grid,
            progress=progress,
        )
    return out, counted.nfe


def _lookup(name: str) -> Callable[..., torch.Tensor]:
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _check_eps(eps: float, sde: SDE) -> None:
    if not isinstance(eps, numbers.Real) or not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T) = (0, {sde.T}), got {eps!r}")


__all__ = [
    "REQUIREMENTS",
    "SAMPLERS",
    "CountingScore",
    "check_applicable",
    "check_options",
    "decode",
    "encode",
    "fit_schedule",
    "sample",
    "sampler_options",
    "tweedie_denoise",
]
