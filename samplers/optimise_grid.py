"""Optimised time grids: fit a solver's time steps to a high-NFE reference trajectory.

    python -m tasks.schedules fit --sde vp --data gmm8 --solver unipc --nfe 10 --out s.json

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
   better of the DP grid and the fixed grids. A trial that moves the k-th time leaves the
   solver's steps before it unchanged, so the score evaluations of the best run so far are
   replayed while a trial's inputs equal them bit for bit: a sweep pays for the evaluations from
   the k-th on, about half of them, and finds the same schedule as evaluating every call.

steps = nfe - 1 with the final denoising (nfe with --no-denoise). Scores may be any model; the
command line (tasks/schedules.py) fits a trained checkpoint (--checkpoint PATH) or the exact score
of a mixture data set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sde_lib import SDE, ScoreFn

from .exponential import data_prediction, exp_weights, lam, step_h, tweedie_denoise
from .grids import (
    GRIDS,
    get_grid,
    intervals,
    lambda_positions,
    log_snr,
    logsnr_grid,
    schedule_times,
)
from .ode import FIXED_METHODS


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


class _Replay:
    """score_fn, answering a call from the kept run's record where the call's (x, t) equals, bit
    for bit, the kept run's call at the same position; otherwise by evaluating it."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn = score_fn
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.evaluated = 0
        self.replayed = 0

    def begin(self) -> None:
        self.calls = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = len(self.calls)
        if i < len(self.kept):
            kx, kt, out = self.kept[i]
            if torch.equal(kt, t) and torch.equal(kx, x):
                self.calls.append(self.kept[i])
                self.replayed += 1
                return out.clone()  # the solver may update its score in place
        out = self.score_fn(x, t)
        self.calls.append((x.clone(), t.clone(), out.clone()))
        self.evaluated += 1
        return out


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
    x0 = torch.stack(
        [
            (
                states[i]
                + sigma[i] ** 2
                * score_fn(states[i], states[i].new_full((states.shape[1],), float(ts[i])))
            )
            / alpha[i]
            for i in range(m)
        ]
    )
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
    compare: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Times (steps + 1,) float64 from T to eps fitted for `sampler` on the batch x_T (B, *D).

    score_fn and x_T may be lists (one schedule for several models / laws: the objective is the
    weighted sum, the DP grid is that of the first). weights: one per batch (default all 1);
    normalise=True also divides each batch's error by its error on the logSNR grid, so that
    models of very different scales (2-D points, 8x8 images) count by their relative
    improvement. Returns (times, info) with info the (weighted) mean squared errors to the
    reference of the DP grid, of each fixed grid and of the result; `compare` maps names to
    other complete runs x_T -> x_0 (their own final evaluation included) scored on the same
    batches and reference, in info["mse_compare"]. A reference costs
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
        refs = [
            reference(sde, f, x, eps, candidates, substeps)
            for f, x in zip(scores_fns, batches, strict=True)
        ]
        targets = [
            tweedie_denoise(sde, f, st[-1], eps) if denoise else st[-1]
            for f, (_, st) in zip(scores_fns, refs, strict=True)
        ]

        replays = [_Replay(f) for f in scores_fns]

        def keep_last_run() -> None:
            for f in replays:
                f.kept = f.calls

        def errors(times: torch.Tensor) -> list[float]:
            out = []
            for f, x, target in zip(replays, batches, targets, strict=True):
                f.begin()
                y = sampler(sde, f, x.clone(), steps=steps, eps=eps, grid=times, **options)
                y = tweedie_denoise(sde, f, y, eps) if denoise else y
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
            if (
                float((h[1:] / h[:-1]).abs().max().clamp_min(1)) > max_step_ratio
                or float((h[:-1] / h[1:]).abs().max()) > max_step_ratio
            ):
                return float("inf")
            err = sum(wi * e for wi, e in zip(w, errors(times), strict=True))
            return err if math.isfinite(err) else float("inf")

        ts, states = refs[0]
        starts = {"dp": dp_grid(sde, scores_fns[0], ts, states, steps)}
        starts.update({g: get_grid(g, sde, steps, eps) for g in GRIDS})
        scores: dict[str, float] = {}
        for key, times in starts.items():
            value = loss(times)
            if value < min(scores.values(), default=float("inf")):
                keep_last_run()
            scores[key] = value
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
                            keep_last_run()
                        else:
                            break
            delta /= 2
        others = {}
        for key, run in (compare or {}).items():
            errs = [
                (run(x.clone()) - target).double().square().flatten(1).sum(1).mean().item()
                for x, target in zip(batches, targets, strict=True)
            ]
            others[key] = sum(wi * e for wi, e in zip(w, errs, strict=True))
    info = {
        "start": name,
        "mse_start": scores,
        "mse": best,
        "positions": u,
        "weights": w,
        "evaluations": sum(f.evaluated for f in replays),
        "replayed": sum(f.replayed for f in replays),
    }
    if compare:
        info["mse_compare"] = others
    return times_of(u), info


# the samplers whose output is a deterministic map of x_T onto the probability-flow ODE's end,
# the only ones a schedule can be fitted for (ddim with eta = 0, ode with a fixed-step method)
FITTABLE = ("fast", "dpm_solver", "dpm_solver3", "unipc", "ipndm", "heun", "ddim", "ode")


def check_fittable(sampler: str, options: dict, steps: int | None) -> None:
    """Raise ValueError unless a schedule can be fitted for this sampler, options and steps."""
    if sampler not in FITTABLE:
        raise ValueError(
            f"it fits the steps of a deterministic solver ({', '.join(FITTABLE)}); "
            f"sampler {sampler!r} is not one"
        )
    if steps is None:
        raise ValueError(f"it needs a fixed step count; set steps for sampler {sampler!r}")
    if sampler == "ddim" and float(options.get("eta", 0.0)) != 0.0:
        raise ValueError("it needs ddim with eta=0 (deterministic)")
    if sampler == "ode" and options.get("method", "dopri5") not in FIXED_METHODS:
        raise ValueError(f"it needs ode with a fixed-step method ({', '.join(FIXED_METHODS)})")
