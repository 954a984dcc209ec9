"""Imputation: the replacement method with the PC sampler (Song et al. 2021, App. I.2), and the
same draws corrected to the model's exact conditional law by importance resampling."""

from __future__ import annotations

import math

import torch

from likelihood import log_likelihood
from sde_lib import SDE, ScoreFn, as_noise

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
        z = as_noise(generator).randn(x.shape, dtype=x.dtype, device=x.device)  # or keyed noise
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


def inpaint_resampled(
    sde: SDE,
    score_fn: ScoreFn,
    known: torch.Tensor,
    mask: torch.Tensor,
    *,
    n_candidates: int = 32,
    n_proposals: int = 2,
    proposal_steps: int = 100,
    n_centers: int = 1024,
    bandwidth: float = 1.0,
    divergence: str = "exact",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    chunk: int = 4096,
) -> tuple[torch.Tensor, int]:
    """Impute from the model's own conditional law: replacement draws corrected by
    sampling-importance-resampling (Rubin 1988) against the model's PF-ODE density.

    known: (B, *D); mask: bool of shape D (one pattern for all rows), True where known.
    1. `n_proposals` x B replacement draws (`inpaint`, `proposal_steps` PC steps) give the unknown
       coordinates a proposal; a Gaussian kernel density q over `n_centers` of them (diagonal
       Scott bandwidth x `bandwidth`) makes it a density that covers every mode they reach.
    2. For each row, `n_candidates` draws z ~ q are weighted by p(z, y) / q(z), where log p is the
       model's log-density of the completed point through the probability-flow ODE
       (`likelihood.log_likelihood`, t from 1e-5, `divergence`, `rtol`, `atol`); one is kept with
       probability proportional to its weight.
    The result converges to the model's conditional p(x_u | y) as the candidates grow (with the
    exact score: the data law's conditional), whereas the replacement method alone is biased for
    multimodal laws. Meant for low-dimensional unknowns. Returns (x: (B, *D), nfe).
    """

    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(known.shape[1:]):
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(known.shape[1:])} "
            f"(one pattern for all rows), got {mask.dtype} {tuple(mask.shape)}"
        )
    for name, v in (
        ("n_candidates", n_candidates),
        ("n_proposals", n_proposals),
        ("n_centers", n_centers),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    b = known.shape[0]
    free = ~mask.reshape(-1).to(known.device)
    props, nfe = inpaint(
        sde,
        score_fn,
        known.repeat_interleave(n_proposals, 0),
        mask,
        steps=proposal_steps,
        generator=generator,
        eps=eps,
    )
    u = props.flatten(1)[:, free].double()
    centers = u[torch.randperm(u.shape[0], generator=generator, device=u.device)[:n_centers]]
    nc, d = centers.shape
    h = bandwidth * centers.std(0).clamp_min(1e-6) * nc ** (-1 / (d + 4))
    pick = torch.randint(nc, (b * n_candidates,), generator=generator, device=u.device)
    z = centers[pick] + h * torch.randn(
        b * n_candidates, d, generator=generator, dtype=torch.float64, device=u.device
    )
    norm = math.log(nc) + 0.5 * d * math.log(2 * math.pi) + h.log().sum()
    log_q = torch.cat(
        [
            torch.logsumexp(-0.5 * ((zc[:, None] - centers[None]) / h).square().sum(-1), 1) - norm
            for zc in z.split(chunk)
        ]
    )
    full = known.flatten(1).repeat_interleave(n_candidates, 0).clone()
    full[:, free] = z.to(full.dtype)
    full = full.reshape(b * n_candidates, *known.shape[1:])
    log_p, nfe_p = log_likelihood(
        sde,
        score_fn,
        full,
        divergence=divergence,
        rtol=rtol,
        atol=atol,
        eps=1e-5,
        generator=generator,
    )
    weights = torch.softmax((log_p.double() - log_q).reshape(b, n_candidates), dim=1)
    keep = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    x = full.reshape(b, n_candidates, *known.shape[1:])[torch.arange(b), keep]
    return torch.where(mask, known, x), nfe + nfe_p
