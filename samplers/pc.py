"""Predictor-corrector samplers for the reverse SDE (Song et al. 2021, Sec. 4.2 and Algs. 2-5).

A predictor moves x from time t to an earlier time s < t; a corrector then runs MCMC steps that
target p_s. Both are plain functions of one interval `step` of the time grid (a `grids.Step`, with
t, s and alpha, sigma at both ends as Python floats); the PC sampler pairs any predictor with any
corrector:

    predictor(sde, score_fn, x, step, generator) -> x
    corrector(sde, score_fn, x, step, *, snr, n_steps, generator) -> x

x is (B, *D) for any data rank; per-example scalars are (B,) and broadcast with `append_dims`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sde_lib import SDE, ScoreFn, append_dims, as_noise, randn_like
from sde_lib.options import Choice, Number, check_options

from .brownian import KeyedBrownian
from .grids import Step, get_grid, intervals


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    """Noise like x from a torch.Generator or a per-sample noise source (sde_lib.noise)."""
    return randn_like(x, generator)


# ---------------------------------------------------------------- predictors: x_t -> x_s, s < t


def euler_maruyama(
    sde: SDE, score_fn: ScoreFn, x: torch.Tensor, step: Step, generator: torch.Generator | None
) -> torch.Tensor:
    """Euler-Maruyama step of the reverse SDE dx = [f - g^2 score] dt + g dw_bar over dt = s - t."""
    drift, g = sde.reverse(score_fn).sde(x, x.new_full((x.shape[0],), step.t))
    h = step.t - step.s
    return x - h * drift + append_dims(g * h**0.5, x.ndim) * _randn(x, generator)


def reverse_diffusion(
    sde: SDE, score_fn: ScoreFn, x: torch.Tensor, step: Step, generator: torch.Generator | None
) -> torch.Tensor:
    """Reverse of the forward discretisation s -> t (Song et al. 2021, eq. 46)."""
    tb = x.new_full((x.shape[0],), step.t)
    rev_f, G = sde.reverse(score_fn).discretize(x, tb, step.t - step.s)
    return x - rev_f + append_dims(G, x.ndim) * _randn(x, generator)


VARIANCES = ("posterior", "beta")
# sample_ancestral's options and their allowed values (run.py's validation reads them too)
ANCESTRAL_RULES = {"variance": Choice(*VARIANCES)}


def ancestral(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    step: Step,
    generator: torch.Generator | None,
    variance: str = "posterior",
) -> torch.Tensor:
    """Ancestral step: sample the Gaussian posterior q(x_s | x_t, x_0) with x_0 from Tweedie.

    With the forward transition x_t = a x_s + sqrt(v) z, a = alpha_t / alpha_s and
    v = sigma_t^2 - a^2 sigma_s^2, the step is x_s = (x_t + v score) / a + sigma_step z: DDPM's
    ancestral step for VP (Ho et al. 2020, Alg. 2) and SMLD's for VE. The step's variance is
    Ho et al.'s choice (Sec. 3.2): "posterior", sigma_step^2 = beta-tilde = v sigma_s^2 /
    sigma_t^2 (the posterior's own variance, optimal for a point-mass x_0), or "beta",
    sigma_step^2 = v, the forward step's variance (for VP exactly DDPM's beta_t; optimal for
    x_0 ~ N(0, I)). Both give the same law as the steps get small.
    """
    ANCESTRAL_RULES["variance"].check("variance", variance)
    a = step.alpha_t / step.alpha_s
    v = max(step.sigma_t**2 - (a * step.sigma_s) ** 2, 0.0)
    score = score_fn(x, x.new_full((x.shape[0],), step.t))
    std = v**0.5 * step.sigma_s / step.sigma_t if variance == "posterior" else v**0.5
    return (x + v * score) / a + std * _randn(x, generator)


def no_predictor(
    sde: SDE, score_fn: ScoreFn, x: torch.Tensor, step: Step, generator: torch.Generator | None
) -> torch.Tensor:
    """Leave x unchanged (corrector-only sampling)."""
    return x


PREDICTORS: dict[str, Callable] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
    "none": no_predictor,
}


# ---------------------------------------------------------------- correctors: MCMC targeting p_s


def langevin(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    step: Step,
    *,
    snr: float,
    n_steps: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Langevin MCMC at time s with step 2 alpha_i (snr ||z|| / ||score||)^2 (Song et al., Alg. 5).

    alpha_i = (alpha_t / alpha_s)^2 is 1 - beta_i for VP and 1 for VE. ||z|| and ||score|| are
    batch means of the per-example norms, as in Song et al.'s code: per-example norms are unstable
    in low dimension, since ||score|| nears 0 at every mode and saddle of p_s and the step grows as
    1 / ||score||^2 (on gmm8 that throws about 4% of the samples far off the data).
    """
    alpha = (step.alpha_t / step.alpha_s) ** 2
    tb = x.new_full((x.shape[0],), step.s)
    for _ in range(n_steps):
        grad = score_fn(x, tb)
        z = _randn(x, generator)
        ratio = z.flatten(1).norm(dim=1).mean() / grad.flatten(1).norm(dim=1).mean()
        size = (2 * alpha * snr**2) * ratio.square()
        x = x + size * grad + (2 * size).sqrt() * z
    return x


def annealed_langevin(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    step: Step,
    *,
    snr: float,
    n_steps: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Annealed Langevin dynamics at s with step 2 alpha_i (snr sigma_s)^2 (Song & Ermon 2019)."""
    size = 2 * (step.alpha_t / step.alpha_s) ** 2 * (snr * step.sigma_s) ** 2
    tb = x.new_full((x.shape[0],), step.s)
    for _ in range(n_steps):
        x = x + size * score_fn(x, tb) + (2 * size) ** 0.5 * _randn(x, generator)
    return x


def no_corrector(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    step: Step,
    *,
    snr: float,
    n_steps: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Leave x unchanged (predictor-only sampling)."""
    return x


CORRECTORS: dict[str, Callable] = {
    "langevin": langevin,
    "annealed_langevin": annealed_langevin,
    "none": no_corrector,
}

# sample_pc's options and their allowed values (run.py's validation reads them too)
PC_RULES = {
    "predictor": Choice(*PREDICTORS),
    "corrector": Choice(*CORRECTORS),
    "snr": Number(lo=0, lo_open=True),
    "n_corrector_steps": Number(lo=0, integer=True),
}


# ---------------------------------------------------------------- samplers


def sample_pc(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 1000,
    eps: float = 1e-3,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    grid: str = "uniform",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Predictor-corrector sampler (Song et al. 2021, Alg. 1): x_T (B, *D) -> x_eps (B, *D).

    Each of the `steps` intervals t -> s of the grid takes one predictor step and then
    `n_corrector_steps` corrector steps at s. Score evaluations: steps * (1 + n_corrector_steps),
    less where the predictor or corrector is "none".
    """
    predict, correct = check_pc(predictor, corrector, snr, n_corrector_steps)
    for step in intervals(sde, get_grid(grid, sde, steps, eps), progress):
        x = predict(sde, score_fn, x, step, generator)
        x = correct(sde, score_fn, x, step, snr=snr, n_steps=n_corrector_steps, generator=generator)
    return x


def _predictor_only(predictor: str, doc: str) -> Callable[..., torch.Tensor]:
    """A sampler that runs one predictor with no corrector (the shared signature, own doc)."""

    def sampler(
        sde: SDE,
        score_fn: ScoreFn,
        x: torch.Tensor,
        *,
        steps: int = 1000,
        eps: float = 1e-3,
        grid: str = "uniform",
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        return sample_pc(
            sde,
            score_fn,
            x,
            steps=steps,
            eps=eps,
            predictor=predictor,
            corrector="none",
            grid=grid,
            generator=generator,
            progress=progress,
        )

    sampler.__doc__ = doc
    return sampler


def sample_em(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 1000,
    eps: float = 1e-3,
    grid: str = "uniform",
    brownian: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6): x_T (B, *D) -> x_eps.

    brownian: the noise of each step is the increment over [s, t] of one Brownian path per
    sample (`samplers.brownian`, in u = (t - eps) / (T - eps)), so other step counts refine the
    same path (strong convergence); else a fresh keyed draw per step.
    """
    if not brownian:
        return sample_pc(sde, score_fn, x, steps=steps, eps=eps, predictor="euler_maruyama",
                         corrector="none", grid=grid, generator=generator,
                         progress=progress)  # fmt: skip
    path = KeyedBrownian(as_noise(generator), tuple(x.shape), dtype=x.dtype, device=x.device)
    span = sde.T - eps
    reverse = sde.reverse(score_fn)
    for step in intervals(sde, get_grid(grid, sde, steps, eps), progress):
        drift, g = reverse.sde(x, x.new_full((x.shape[0],), step.t))
        u_t = min(max((step.t - eps) / span, 0.0), 1.0)
        u_s = min(max((step.s - eps) / span, 0.0), 1.0)
        dw = span**0.5 * (path(u_t) - path(u_s))
        x = x - (step.t - step.s) * drift + append_dims(g, x.ndim) * dw
    return x


sample_reverse_diffusion = _predictor_only(
    "reverse_diffusion",
    "Reverse-diffusion predictor alone (Song et al. 2021, eq. 46): x_T (B, *D) -> x_eps.",
)


def sample_ancestral(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 1000,
    eps: float = 1e-3,
    grid: str = "uniform",
    variance: str = "posterior",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2, for any linear SDE): x_T (B, *D) -> x_eps.

    variance: "posterior" (sigma_t^2 = beta-tilde_t) or "beta" (sigma_t^2 = beta_t), Ho et al.
    Sec. 3.2; see `ancestral`. With steps=1000 on the default VP the steps are DDPM's T = 1000
    linear betas. One score evaluation per step.
    """
    ANCESTRAL_RULES["variance"].check("variance", variance)
    for step in intervals(sde, get_grid(grid, sde, steps, eps), progress):
        x = ancestral(sde, score_fn, x, step, generator, variance)
    return x


def check_pc(
    predictor: str, corrector: str, snr: float, n_corrector_steps: int
) -> tuple[Callable, Callable]:
    """Validate the PC options; return the (predictor, corrector) functions."""
    check_options(
        PC_RULES,
        dict(
            predictor=predictor, corrector=corrector, snr=snr, n_corrector_steps=n_corrector_steps
        ),
    )
    return PREDICTORS[predictor], CORRECTORS[corrector]
