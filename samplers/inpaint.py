"""Imputation by the replacement method with the PC sampler (Song et al. 2021, App. I.2)."""

from __future__ import annotations

import torch

from sde_lib import SDE, ScoreFn

from .api import CountingScore, tweedie_denoise
from .grids import get_grid, intervals
from .pc import check_pc


def inpaint(
    sde: SDE,
    score_fn: ScoreFn,
    known: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int = 1000,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    grid: str = "uniform",
    denoise: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Fill the coordinates where mask is False, given known: (B, *D). Returns (x: (B, *D), nfe).

    mask: bool, broadcastable to known.shape, True where the value is known. After every predictor
    and corrector step at time t the known coordinates are replaced by a fresh forward draw
    alpha_t known + sigma_t z; at the end they are copied from `known` exactly.
    """
    predict, correct = check_pc(predictor, corrector, snr, n_corrector_steps)
    if denoise is not True and denoise is not False:
        raise ValueError(f"denoise must be True or False, got {denoise!r}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = known), got dtype {mask.dtype}")
    mask = torch.broadcast_to(mask.to(known.device), known.shape)
    grid_ts = get_grid(grid, sde, steps, eps)

    def replace(x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.where(mask, alpha * known + sigma * z, x)

    counted = CountingScore(score_fn)
    with torch.no_grad():
        x = sde.prior_sampling(
            known.shape, generator=generator, device=known.device, dtype=known.dtype
        )
        for i, st in enumerate(intervals(sde, grid_ts, progress)):
            if i == 0:
                x = replace(x, st.alpha_t, st.sigma_t)
            x = replace(predict(sde, counted, x, st, generator), st.alpha_s, st.sigma_s)
            x = correct(
                sde, counted, x, st, snr=snr, n_steps=n_corrector_steps, generator=generator
            )
            x = replace(x, st.alpha_s, st.sigma_s)
        if denoise:
            x = tweedie_denoise(sde, counted, x, eps)
    return torch.where(mask, known, x), counted.nfe
