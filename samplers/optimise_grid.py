"""Optimised time grids: fit a solver's time steps to a high-NFE reference trajectory.

    python -m samplers.optimise_grid --sde vp --data gmm8 --solver unipc --nfe 10 --out s.json

then `sampler.grid=s.json` (or `grid="s.json"` in Python) uses the schedule with any sampler of the
same `steps`. The fit, for a score model, a solver, an NFE budget and a calibration batch x_T:

1. reference: the trajectory of x_T under DPM-Solver++(3M) on a logSNR grid of
   `candidates` x `substeps` steps, kept at the `candidates` + 1 candidate times (uniform in
   lambda), and its denoised end;
2. GITS-style dynamic programming (Chen et al. 2024): the path of `steps` intervals through the
   candidate times that minimises the sum of the local errors of first-order data-prediction
   steps from the reference, each scaled by how much it grows to t = eps under a Gaussian law of
   the batch's variance;
3. the interior times, as positions in lambda, are then refined by pattern search on the mean
   squared distance of the chosen solver's denoised output to the reference's, starting from the
   better of the DP grid and the fixed grids.

steps = nfe - 1 with the final denoising (nfe with --no-denoise). Scores may be any model; the CLI
fits a trained checkpoint (--checkpoint PATH) or the exact score of a mixture data set.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch

from sde_lib import SDE, ScoreFn

from .exponential import data_prediction, exp_weights, lam, step_h
from .grids import (
    GRIDS,
    get_grid,
    intervals,
    lambda_positions,
    log_snr,
    logsnr_grid,
    save_schedule,
    schedule_times,
)
from .ode import FIXED_METHODS


def _denoise(sde: SDE, score_fn: ScoreFn, x: torch.Tensor, t: float) -> torch.Tensor:
    alpha, sigma = (v.item() for v in sde.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
    return (x + sigma**2 * score_fn(x, x.new_full((x.shape[0],), t))) / alpha


def reference(
    sde: SDE, score_fn: ScoreFn, x_T: torch.Tensor, eps: float, candidates: int, substeps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(times (M + 1,), states (M + 1, B, *D)) of the reference trajectory at the candidates."""
    fine = logsnr_grid(sde, candidates * substeps, eps)
    ts = fine[::substeps]
    states = [x_T]
    x = x_T
    history: list = []  # third-order exponential multistep (DPM-Solver++(3M)) on the fine grid
    for i, st in enumerate(intervals(sde, fine)):
        x0 = data_prediction(score_fn, x, st.t, st.alpha_t, st.sigma_t)
        lam_t = lam(st.alpha_t, st.sigma_t)
        history = [(lam_t, x0), *history][:3]
        w = exp_weights([lj - lam_t for lj, _ in history], step_h(st))
        x = (st.sigma_s / st.sigma_t) * x + st.alpha_s * sum(
            wi * m for wi, (_, m) in zip(w, history, strict=True)
        )
        if (i + 1) % substeps == 0:
            states.append(x)
    return ts, torch.stack(states)


def dp_grid(
    sde: SDE, score_fn: ScoreFn, ts: torch.Tensor, states: torch.Tensor, steps: int
) -> torch.Tensor:
    """GITS dynamic programming over the candidate times ts (M + 1,): the best `steps`-interval
    path from ts[0] = T to ts[-1] = eps under first-order local errors: (steps + 1,) float64."""
    m = ts.numel() - 1
    if steps > m:
        raise ValueError(f"steps={steps} needs more than {m} candidate times")
    alpha, sigma = (v.tolist() for v in sde.alpha_sigma(ts))
    lam = log_snr(sde, ts).tolist()
    var = states[-1].flatten(1).var(0).mean().item()
    x0 = torch.stack([
        (states[i] + sigma[i] ** 2 * score_fn(states[i], states[i].new_full((states.shape[1],),
         float(ts[i])))) / alpha[i] for i in range(m)
    ])  # fmt: skip
    inf = float("inf")
    cost = torch.full((m + 1, m + 1), inf, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m + 1):
            h = lam[j] - lam[i]
            pred = (sigma[j] / sigma[i]) * states[i] - (alpha[j] * math.expm1(-h)) * x0[i]
            grow = 1 / (alpha[j] * math.sqrt(var + (sigma[j] / alpha[j]) ** 2))
            cost[i, j] = (grow**2) * (pred - states[j]).double().square().mean().item()
    best = torch.full((steps + 1, m + 1), inf, dtype=torch.float64)
    arg = torch.zeros((steps + 1, m + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + cost  # (from, to)
        best[k], arg[k] = total.min(0)
    path = [m]
    for k in range(steps, 0, -1):
        path.append(int(arg[k, path[-1]]))
    return ts[list(reversed(path))].clone()


def optimise_grid(
    sde: SDE,
    score_fn: ScoreFn | list[ScoreFn],
    x_T: torch.Tensor | list[torch.Tensor],
    sampler: Callable[..., torch.Tensor],
    steps: int,
    *,
    eps: float = 1e-3,
    denoise: bool = True,
    candidates: int = 100,
    substeps: int = 4,
    sweeps: int = 4,
    options: dict | None = None,
    max_step_ratio: float = 3.0,
    weights: list[float] | None = None,
    normalise: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Times (steps + 1,) float64 from T to eps fitted for `sampler` on the batch x_T (B, *D).

    score_fn and x_T may be lists (one schedule for several models / laws: the objective is the
    weighted sum, the DP grid is that of the first). weights: one per batch (default all 1);
    normalise=True also divides each batch's error by its error on the logSNR grid, so that
    models of very different scales (2-D points, 8x8 images) count by their relative
    improvement. Returns (times, info) with info the (weighted) mean squared errors to the
    reference of the DP grid, of each fixed grid and of the result. A reference costs
    candidates x substeps evaluations; each objective call `steps` (+ 1) evaluations per batch.

    Neighbouring steps in lambda may differ by at most `max_step_ratio`: with exact scores an
    unconstrained fit learns near-empty steps that multistep solvers turn into large
    extrapolation weights, which amplify a trained network's error (on digits, FID 68 at 10 NFE
    against 7-10 for the fixed grids before this bound).
    """
    options = dict(options or {})
    scores_fns = score_fn if isinstance(score_fn, list) else [score_fn]
    batches = x_T if isinstance(x_T, list) else [x_T]
    if weights is not None and len(weights) != len(batches):
        raise ValueError(f"weights must be one number per batch ({len(batches)}), got {weights!r}")
    with torch.no_grad():
        refs = [reference(sde, f, x, eps, candidates, substeps) for f, x in zip(scores_fns,
                batches, strict=True)]  # fmt: skip
        targets = [_denoise(sde, f, st[-1], eps) if denoise else st[-1]
                   for f, (_, st) in zip(scores_fns, refs, strict=True)]  # fmt: skip

        def errors(times: torch.Tensor) -> list[float]:
            out = []
            for f, x, target in zip(scores_fns, batches, targets, strict=True):
                y = sampler(sde, f, x.clone(), steps=steps, eps=eps, grid=times, **options)
                y = _denoise(sde, f, y, eps) if denoise else y
                out.append((y - target).double().square().flatten(1).sum(1).mean().item())
            return out

        w = [1.0] * len(batches) if weights is None else [float(v) for v in weights]
        if normalise:
            base = errors(get_grid("logsnr", sde, steps, eps))
            w = [wi / max(e, 1e-300) for wi, e in zip(w, base, strict=True)]

        def loss(times: torch.Tensor) -> float:
            if not (times.diff() < 0).all():  # positions closer than the bisection resolves
                return float("inf")
            h = log_snr(sde, times).diff()
            if float((h[1:] / h[:-1]).abs().max().clamp_min(1)) > max_step_ratio or float(
                (h[:-1] / h[1:]).abs().max()
            ) > max_step_ratio:
                return float("inf")
            err = sum(wi * e for wi, e in zip(w, errors(times), strict=True))
            return err if math.isfinite(err) else float("inf")

        ts, states = refs[0]
        starts = {"dp": dp_grid(sde, scores_fns[0], ts, states, steps)}
        starts.update({g: get_grid(g, sde, steps, eps) for g in GRIDS})
        scores = {k: loss(v) for k, v in starts.items()}
        name = min(scores, key=scores.get)
        u = lambda_positions(sde, starts[name], eps)

        def times_of(u: list[float]) -> torch.Tensor:
            return schedule_times(sde, u, eps)

        best = scores[name]
        delta = 0.5
        for _ in range(sweeps):
            for k in range(1, steps):
                for sign in (1.0, -1.0):
                    while True:
                        lo, hi = u[k - 1], u[k + 1]
                        trial = u[k] + sign * delta * (hi - lo) / 2
                        if not lo < trial < hi:
                            break
                        cand = [*u[:k], trial, *u[k + 1 :]]
                        value = loss(times_of(cand))
                        if value < best:
                            best, u = value, cand
                        else:
                            break
            delta /= 2
    info = {"start": name, "mse_start": scores, "mse": best, "positions": u, "weights": w}
    return times_of(u), info


# the samplers whose output is a deterministic map of x_T onto the probability-flow ODE's end,
# the only ones a schedule can be fitted for (ddim with eta = 0, ode with a fixed-step method)
FITTABLE = ("fast", "dpm_solver", "dpm_solver3", "unipc", "ipndm", "heun", "ddim", "ode")


def check_fittable(sampler: str, options: dict, steps: int | None) -> None:
    """Raise ValueError unless a schedule can be fitted for this sampler, options and steps."""
    if sampler not in FITTABLE:
        raise ValueError(f"it fits the steps of a deterministic solver ({', '.join(FITTABLE)}); "
                         f"sampler {sampler!r} is not one")  # fmt: skip
    if steps is None:
        raise ValueError(f"it needs a fixed step count; set steps for sampler {sampler!r}")
    if sampler == "ddim" and float(options.get("eta", 0.0)) != 0.0:
        raise ValueError("it needs ddim with eta=0 (deterministic)")
    if sampler == "ode" and options.get("method", "dopri5") not in FIXED_METHODS:
        raise ValueError(f"it needs ode with a fixed-step method ({', '.join(FIXED_METHODS)})")


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
) -> tuple[torch.Tensor, dict]:
    """Times (steps + 1,) fitted for the named sampler (with its options) to score_fn's own flow.

    shape: one sample's shape (D,) or (C, H, W). The calibration batch is `batch` prior draws
    (default 1000 points, 256 images) from a generator seeded with `seed`, so a fit is
    reproducible and independent of the noise it is later used with, on `device` in `dtype`
    (default: the prior's). This is `grid="fit"` of `samplers.sample`, `sampler.grid=fit` of
    run.py and the fit of the command line below.
    """
    from . import api

    options = {k: v for k, v in (options or {}).items() if k not in ("grid", "steps")}
    check_fittable(sampler, options, steps)
    n = batch or (1000 if len(shape) == 1 else 256)
    x_T = sde.prior_sampling((n, *shape), generator=torch.Generator().manual_seed(seed))
    x_T = x_T.to(device=device, dtype=dtype or x_T.dtype)
    return optimise_grid(sde, score_fn, x_T, api._lookup(sampler), steps, eps=eps,
                         denoise=denoise, options=options)  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    """The command line: fit a schedule for a trained checkpoint (--checkpoint) or for the exact
    score of a mixture data set (--sde, --data), and write it as JSON."""
    from tasks.common import UserError
    from training.checkpoint import CheckpointError

    from . import api

    parser = argparse.ArgumentParser(
        prog="python -m samplers.optimise_grid", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a trained score model's checkpoint: its SDE, data shape and EMA "
                        "weights (then --sde / --data are taken from it)")  # fmt: skip
    parser.add_argument("--sde", choices=("vp", "subvp", "ve"), default=None,
                        help="exact mixture score: the SDE (default vp)")  # fmt: skip
    parser.add_argument("--data", choices=("gmm8", "mix5d"), default=None,
                        help="exact mixture score: the law (default gmm8)")  # fmt: skip
    parser.add_argument("--solver", default="unipc", help="a sampler name (see samplers.SAMPLERS)")
    parser.add_argument("--nfe", type=int, default=10, help="budget, final denoising included")
    parser.add_argument("--no-denoise", action="store_true")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=None,
                        help="calibration batch size (default 1000 points, 256 images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="JSON schedule file to write")
    a = parser.parse_args(argv)
    if a.checkpoint is not None and (a.sde or a.data):
        parser.error("--sde / --data come from the checkpoint; drop them or drop --checkpoint")
    steps = a.nfe - (0 if a.no_denoise else 1)
    if steps < 1:
        parser.error(f"--nfe {a.nfe} leaves no solver step")
    try:
        api._lookup(a.solver)
        if a.checkpoint is not None:
            sde, score_fn, shape, source = _from_checkpoint(a.checkpoint)
        else:
            sde, score_fn, shape, source = _exact(a.sde or "vp", a.data or "gmm8")
        times, info = fit_schedule(sde, score_fn, shape, a.solver, steps, eps=a.eps,
                                   denoise=not a.no_denoise, batch=a.batch, seed=a.seed,
                                   dtype=torch.float64 if a.checkpoint is None else None)
        path = save_schedule(a.out, times, sde=repr(sde), **source, solver=a.solver, nfe=a.nfe,
                             eps=a.eps, denoise=not a.no_denoise, fit=info)  # fmt: skip
    except (ValueError, OSError, UserError, CheckpointError) as e:
        parser.exit(2, f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
    print(f"wrote {path}: steps={steps}, start {info['start']}, mse {info['mse']:.3g} "
          f"(fixed grids: {', '.join(f'{k} {v:.3g}' for k, v in info['mse_start'].items())})")
    return path


def _exact(sde_name: str, data: str):
    from data.mixtures import gmm8, mixture5d
    from models.exact import MixtureScore
    from sde_lib import VESDE, VPSDE, subVPSDE

    sde = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}[sde_name]()
    law = gmm8() if data == "gmm8" else mixture5d()
    return sde, MixtureScore(sde, law), (law.dim,), {"data": data}


def _from_checkpoint(path: Path):
    """(sde, EMA score model in eval mode, data shape, record fields) of a score checkpoint."""
    from tasks.common import load_score_model
    from training import checkpoint as ckpt

    saved = ckpt.config_of(ckpt.load(path))
    sde, dataset, model, found = load_score_model({**saved, "ckpt": str(path)}, log=lambda *m: None)
    return sde, model, tuple(dataset.shape), {"checkpoint": str(found),
                                               "data": saved["data"]["name"]}  # fmt: skip


if __name__ == "__main__":
    main()
