"""Samplers for score-based SDE models: predictor-corrector, probability-flow ODE, DDIM,
DPM-Solver++(2M), Heun, and imputation (sample-quality measures live in `metrics`).

Start with `sample(sde, score_fn, shape, sampler=..., steps=...) -> (x, nfe)`; every name in
SAMPLERS is a plain function with the shared signature described in `samplers.api`.
"""

from .api import (
    REQUIREMENTS,
    SAMPLERS,
    CountingScore,
    check_applicable,
    check_options,
    decode,
    encode,
    fit_schedule,
    sample,
    sampler_options,
    tweedie_denoise,
)
from .ddim import sample_ddim
from .dpm_solver import sample_dpm_solver
from .dpm_solver3 import sample_dpm_solver3
from .edm import sample_edm
from .fast import sample_fast
from .grids import (
    GRIDS,
    edm_grid,
    get_grid,
    load_schedule,
    logsnr_grid,
    quadratic_grid,
    save_schedule,
    uniform_grid,
)
from .heun import sample_heun
from .inpaint import inpaint, inpaint_resampled
from .ipndm import sample_ipndm
from .ode import ADAPTIVE_METHODS, FIXED_METHODS, sample_ode
from .path import ChangedPath
from .pc import (
    CORRECTORS,
    PREDICTORS,
    sample_ancestral,
    sample_em,
    sample_pc,
    sample_reverse_diffusion,
)
from .unipc import sample_unipc

__all__ = [
    "ChangedPath",
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "CORRECTORS",
    "GRIDS",
    "PREDICTORS",
    "REQUIREMENTS",
    "SAMPLERS",
    "CountingScore",
    "check_applicable",
    "check_options",
    "fit_schedule",
    "decode",
    "edm_grid",
    "encode",
    "get_grid",
    "inpaint",
    "inpaint_resampled",
    "load_schedule",
    "logsnr_grid",
    "quadratic_grid",
    "sample",
    "sample_ancestral",
    "sample_ddim",
    "sample_dpm_solver",
    "sample_dpm_solver3",
    "sample_em",
    "sample_fast",
    "sample_heun",
    "sample_edm",
    "sample_ipndm",
    "sample_ode",
    "sample_pc",
    "sample_reverse_diffusion",
    "sample_unipc",
    "sampler_options",
    "save_schedule",
    "tweedie_denoise",
    "uniform_grid",
]
