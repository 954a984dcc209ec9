"""`sampler=fast`: the measured-best solver, time grid and final-step policy per kind of SDE.

The kind is read from the SDE's coefficients alone (no isinstance): alpha(T) = 1 is variance
exploding ("ve"), alpha^2 + sigma^2 = 1 variance preserving ("vp"), any other decaying alpha
"subvp". For each kind and every step count in FITTED_STEPS (4..24 steps: 5..25 NFE with the
final denoising; the solver choices were measured at 9 and 19) fast uses a schedule fitted by
`optimise_grid` to the exact scores of gmm8 and the 5-D mixture together and, for the entries
listed under "with_trained_models" in the file, to trained digits U-Nets of that kind as well
(two per kind, a fitted and an undertrained one; VP's 9-, 14- and 19-step entries four, three
and three: see `refit`); the 9- and 19-step (10- and 20-NFE) schedules, and VP's 14-step
(15-NFE) one, are then polished by `gap_constrained_fit` (GAP_CONSTRAINED), which holds the
mixtures' mean exact log-density within GAP_TOL of their reference flow's while it minimises
the trained models' error. Where FINAL_STEP names an entry (sub-VP at 9 steps), the final
evaluation, elsewhere Tweedie's denoising, is one more solver step on its own gap-constrained
schedule (`refit`). The schedules are stored as positions in lambda between lambda(T) and
lambda(eps), so they map onto any eps and any SDE of that kind. Other step counts
use the solver of the nearest measured count on the time-quadratic grid. For a trained model,
grid="fit" (sampler.grid=fit) fits the steps to that model instead. docs/fast-sampling.md has the
figures; refit with
    python -m tasks.schedules refit --images vp=CKPT --images vp=CKPT2 --images subvp=CKPT ...
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import LinearConstraint, NonlinearConstraint, minimize

from data.mixtures import gmm8, mixture5d
from models.exact import MixtureScore
from sde_lib import SDE, VESDE, VPSDE, ScoreFn, subVPSDE
from sde_lib.options import Choice

from .exponential import tweedie_denoise
from .grids import get_grid, lambda_positions, schedule_times
from .ipndm import sample_ipndm
from .optimise_grid import optimise_grid, reference
from .unipc import sample_unipc

log = logging.getLogger(__name__)
SCHEDULE_FILE = Path(__file__).with_name("fast_schedules.json")
SOLVERS = {"unipc": sample_unipc, "ipndm": sample_ipndm}
# sample_fast's options and their allowed values (run.py's validation reads them too)
RULES = {"solver": Choice("auto", *SOLVERS)}
# (kind, steps) -> (solver, options), measured on held-out batches (docs/fast-sampling.md)
CHOICES: dict[tuple[str, int], tuple[str, dict]] = {
    ("vp", 9): ("unipc", dict(lower_order_final=True)),
    ("vp", 19): ("unipc", dict(lower_order_final=True)),
    ("subvp", 9): ("ipndm", dict(lower_order_final=True)),
    ("subvp", 19): ("unipc", dict(lower_order_final=True)),
    ("ve", 9): ("unipc", dict(lower_order_final=True)),
    ("ve", 19): ("ipndm", dict(lower_order_final=True)),
}

# where a gap-constrained entry (GAP_CONSTRAINED) is fitted for another solver than CHOICES
# names: sub-VP at 9 steps polished for iPNDM stayed 1.09 from its digits model's flow (256 draws)
# against 0.70 for UniPC, both within the gap bound; VP at 19 steps fitted for iPNDM (three VP
# U-Nets, also from the time-quadratic grid: GAP_STARTS) is 0.0083-0.0103 from the flows of four
# held-out ones at 20 NFE, where the UniPC entry was 0.0198-0.0392 (256 draws, seed 11); VP at
# 9 steps fitted for UniPC-2 on four VP U-Nets (two undertrained): UniPC-3, fitted so too, ends
# 2-7x further from all four (calibration draws), and fitted to two it was behind k-diffusion's
# best (LMS-Karras) on a held-out undertrained one (37.0 against 28.6; UniPC-2: 1.37); VP at 14
# steps fitted for iPNDM as at 19 (the same three U-Nets): the UniPC-3 entry was behind LMS-Karras
# on a held-out undertrained model at 15 NFE (8.88 from its flow against 8.11; iPNDM: 2.69)
GAP_CONSTRAINED_SOLVER: dict[tuple[str, int], tuple[str, dict]] = {
    ("subvp", 9): ("unipc", dict(lower_order_final=True)),
    ("vp", 9): ("unipc", dict(order=2, lower_order_final=True)),
    ("vp", 14): ("ipndm", dict(lower_order_final=True)),
    ("vp", 19): ("ipndm", dict(lower_order_final=True)),
}


# (kind, steps) -> (solver, options) of the entries whose final evaluation is one more solver step
# to eps instead of Tweedie's denoising (with denoise=True; the schedule, under "final_step" in
# SCHEDULE_FILE, has steps + 1 steps). Sub-VP's sigma(eps) is 1e-4 (VP's and VE's 1e-2), so the
# denoising moves a sample by about 1e-4 and its evaluation is better spent: on the sub-VP digits
# U-Net at 10 NFE, iPNDM on the uniform-t grid is 0.167 from the model's flow with 10 steps
# against 0.253 with 9 and the denoising (256 held-out draws). Fitted as `refit` does for
# iPNDM of order 2, 3 and 4 with and without lower-order final steps, order 3 without them came
# first: 0.044 (order 2: 0.097 / 0.139 with them; order 4 with them 0.75).
FINAL_STEP: dict[tuple[str, int], tuple[str, dict]] = {
    ("subvp", 9): ("ipndm", dict(order=3, lower_order_final=False)),
}
# the step-ratio bound of those schedules: the trained model is in their objective, so the bound
# only has to exclude the near-empty steps of exact-only fits (max_step_ratio), and the uniform-t
# grid, their start, has ratio 5.2 at sub-VP's 10 steps
FINAL_STEP_RATIO = 6.0


def sde_kind(sde: SDE) -> str:
    """'ve', 'vp' or 'subvp' from alpha(t) and sigma(t) at a few times (see module docstring)."""
    t = torch.tensor([0.25, 0.5, sde.T], dtype=torch.float64) * sde.T
    alpha, sigma = sde.alpha_sigma(t)
    if torch.allclose(alpha, torch.ones_like(alpha), rtol=0, atol=1e-9):
        return "ve"
    if torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=0, atol=1e-6):
        return "vp"
    return "subvp"


FITTED_STEPS = range(4, 25)  # schedules are shipped for these step counts (NFE 5..25)


def choose(sde: SDE, steps: int) -> tuple[str, dict, list[float] | None]:
    """(solver name, its options, schedule positions or None) that fast uses for sde, steps.

    The solver is the measured choice at the nearest of 9 / 19 steps; away from those two counts
    the final steps are always lower order (the stable choice without a measurement). A
    gap-constrained entry fitted for another solver takes that one (GAP_CONSTRAINED_SOLVER).
    """
    kind = sde_kind(sde)
    fitted = sorted(n for k, n in CHOICES if k == kind)
    nearest = min(fitted, key=lambda n: (abs(n - steps), n))
    solver, options = CHOICES[(kind, nearest)]
    if steps != nearest:
        options = dict(options, lower_order_final=True)
    if (kind, steps) in GAP_CONSTRAINED_SOLVER:
        solver, options = GAP_CONSTRAINED_SOLVER[(kind, steps)]
    positions = _schedules().get(f"{kind}/{steps}")
    return solver, dict(options), positions


def final_step_entry(sde: SDE, steps: int) -> tuple[str, dict, list[float]] | None:
    """(solver, options, positions of steps + 1 steps) where fast spends its final evaluation on
    one more solver step (FINAL_STEP and a shipped schedule for it), else None."""
    kind = sde_kind(sde)
    positions = _record().get("final_step", {}).get(f"{kind}/{steps}")
    if (kind, steps) not in FINAL_STEP or positions is None:
        return None
    solver, options = FINAL_STEP[(kind, steps)]
    return solver, dict(options), positions


def sample_fast(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 19,
    eps: float = 1e-3,
    solver: str = "auto",
    grid: str | None = None,
    denoise: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The fast default: x_T (B, *D) -> x_0 (B, *D) in steps (+ 1 with denoise) evaluations.

    `sample` passes its denoise flag (True by default), so NFE = steps + 1 there: steps=9 is the
    10-NFE setting and the default 19 the 20-NFE one. With denoise, the final evaluation is
    Tweedie's denoising at eps or, for the entries of FINAL_STEP, one more solver step on their
    (steps + 1)-step schedule (the measured final-step policy). solver="auto" takes the measured
    choice of `choose`; "unipc" or "ipndm" force that solver (with the same grid). grid=None
    takes the fitted schedule (else the time-quadratic grid); any other value is a grid as for
    every sampler (a name of GRIDS or a .json schedule) and then the final evaluation is always
    the denoising. `generator` is unused (deterministic).
    """
    RULES["solver"].check("solver", solver)
    name, options, positions = choose(sde, steps)
    final = final_step_entry(sde, steps) if denoise and grid is None else None
    n = steps
    if final is not None:
        (name, options, positions), n = final, steps + 1
    if solver != "auto":
        name = solver
        options = {}
    if grid is None:
        grid = "quadratic" if positions is None else schedule_times(sde, positions, eps)
    grid = get_grid(grid, sde, n, eps)
    x = SOLVERS[name](sde, score_fn, x, steps=n, eps=eps, grid=grid, progress=progress, **options)
    return tweedie_denoise(sde, score_fn, x, eps) if denoise and final is None else x


_CACHE: dict | None = None


def _order(key: str) -> tuple[int, int]:
    """Sort key of a schedule entry "kind/steps"."""
    kind, steps = key.split("/")
    return ("vp", "subvp", "ve").index(kind), int(steps)


def _record() -> dict:
    """SCHEDULE_FILE's contents ({} without the file), read once."""
    global _CACHE
    if _CACHE is None:
        _CACHE = json.loads(SCHEDULE_FILE.read_text()) if SCHEDULE_FILE.is_file() else {}
    return _CACHE


def _schedules() -> dict[str, list[float]]:
    return _record().get("positions", {})


def max_step_ratio(steps: int) -> float:
    """The bound on neighbouring lambda-steps of the shipped schedules: 3 up to 12 steps, 6 above.

    Unbounded fits to exact scores learn near-empty steps (ratios above 100) that multistep
    solvers turn into large extrapolation weights: on a trained digits U-Net they gave FID 68 at
    10 NFE where every fixed grid gives 7-10. With the bound, 9.5 (10 NFE) and 9.0 (20 NFE); at
    20 NFE the looser bound 6 keeps the exact-score gaps at about 0.02 (3 costs up to 0.1 on VE).
    """
    return 3.0 if steps <= 12 else 6.0


# the trained model's weight in the joint fit above 12 steps (up to 12 it is 1), per kind
TRAINED_WEIGHT_ABOVE_12 = {"vp": 0.2, "subvp": 0.02, "ve": 0.0}


def trained_weight(kind: str, steps: int) -> float:
    """The weight of the trained model's (logSNR-normalised) error in the joint fit: 1 up to 12
    steps; above, the largest of the weights tried (1, 0.2, 0.05, 0.02) that keeps the exact
    mixtures within 0.03 at 20 NFE (20 000 samples): VP 0.2 (gmm8 0.004, mix5d -0.019; weight 1
    gave mix5d -0.080), sub-VP 0.02 (-0.023, 0.022; 0.05 gave gmm8 -0.032), VE 0, i.e. the
    exact-only fit (-0.030 on mix5d already; 0.02 gave -0.036 with UniPC, -0.045 with iPNDM).
    The gap-constrained entries (GAP_CONSTRAINED) take weight 1: the gap bound guards the
    mixtures there."""
    if steps <= 12 or steps in GAP_CONSTRAINED[kind]:  # there the gap bound guards the mixtures
        return 1.0
    return TRAINED_WEIGHT_ABOVE_12[kind]


# per kind, the step counts whose shipped schedule is also held to the exact mixtures'
# log-density gaps (`gap_constrained_fit`; the trained model then has weight 1 in the fit before),
# and the bound on each law's paired gap there (all kinds at 9 and 19 steps since the fit to two
# trained models per kind: docs/fast-sampling.md, held-out models; VP also at 14 steps, where
# the mix5d gap was -0.07 at 15 NFE, against 0.01 at 10 NFE, and is -0.008 now).
GAP_CONSTRAINED = {"vp": (9, 14, 19), "subvp": (9, 19), "ve": (9, 19)}
GAP_TOL = 0.01
# the fixed grids gap_constrained_fit also starts from, besides the joint fit's end: uniform-t
# up to 12 steps, logSNR above; VP's 9-step entry also the EDM grid, its 14- and 19-step ones
# also the time-quadratic grid
GAP_STARTS: dict[tuple[str, int], tuple[str, ...]] = {
    ("vp", 9): ("uniform", "edm"),
    ("vp", 14): ("logsnr", "quadratic"),
    ("vp", 19): ("logsnr", "quadratic"),
}


def gap_starts(kind: str, steps: int) -> tuple[str, ...]:
    """The fixed grids `refit`'s gap-constrained fit of (kind, steps) starts from (GAP_STARTS)."""
    return GAP_STARTS.get((kind, steps), ("uniform",) if steps <= 12 else ("logsnr",))


def gap_constrained_fit(
    sde: SDE,
    steps: int,
    positions: list[float] | None,
    laws: list,
    x_laws: list[torch.Tensor],
    objective: list[tuple[ScoreFn, torch.Tensor]],
    *,
    tol: float = GAP_TOL,
    eps: float = 1e-3,
    evals: int = 600,
    starts: tuple[str, ...] = (),
    hops: int = 0,
    final_step: bool = False,
) -> tuple[list[float], dict]:
    """Fit schedule positions to `objective` with the exact mixtures' log-density gaps within tol.

    The squared distance to the reference flow, which `optimise_grid` minimises, barely sees a
    small systematic change of each component's spread, and the mean log-density is first-order
    sensitive to it: a 3.5 % spread error on gmm8 is a gap of 0.07 at a squared error of 2e-4.
    Here the objective is the (logSNR-normalised) squared error of the `objective` batches
    (score, prior draws), e.g. a trained model's, under the constraints |gap| <= tol for each law,
    where gap is the mean exact log-density of fast's denoised output from x_laws minus that of
    the reference flow from the same draws (paired, so without the sampling noise of a comparison
    with fresh data), and neighbouring lambda-steps within max_step_ratio(steps) (linear
    constraints on the log-steps). Solved by COBYQA (Powell's derivative-free trust-region SQP,
    scipy's "COBYQA"), `evals` evaluations from `positions` (if given) and from each fixed grid
    named in `starts` (blended towards uniform lambda steps until it meets the step-ratio bound:
    `_within_ratio`), then `hops` times from the best end with its log-steps perturbed by
    N(0, 0.3^2) (seeded; the objective has many local minima); the best end within the bounds
    wins (Nelder-Mead on a penalised objective, used before, stalled far from it: 0.62 on sub-VP's
    digits model where COBYQA reaches 0.14, and 0.041 with five hops). final_step=True
    fits the FINAL_STEP entry instead: its solver, steps + 1 steps and no denoising, step ratios
    within FINAL_STEP_RATIO. Returns (positions, info with the gaps, errors, the start the winning
    chain began from, "hop": the basin hop that ended it (0: the start's own fit) and that start's
    gaps and errors).
    """

    if final_step:
        solver, options = FINAL_STEP[(sde_kind(sde), steps)]
        n, bound = steps + 1, FINAL_STEP_RATIO
    else:
        solver, options, _ = choose(sde, steps)
        n, bound = steps, max_step_ratio(steps)
    sampler = SOLVERS[solver]

    def run(score_fn, x, times):
        y = sampler(sde, score_fn, x.clone(), steps=n, eps=eps, grid=times, **options)
        return y if final_step else tweedie_denoise(sde, score_fn, y, eps)

    def flow(score_fn, x):
        return tweedie_denoise(sde, score_fn, reference(sde, score_fn, x, eps, 100, 4)[1][-1], eps)

    def u_of(z) -> list[float]:  # z: the log-steps after the first, relative to it
        z = np.concatenate([[0.0], z])
        inc = np.exp(z - z.max())
        return [0.0, *np.cumsum(inc / inc.sum())[:-1].tolist(), 1.0]

    def z_of(u: list[float]):
        z = np.log(np.diff(np.asarray(u, dtype=np.float64)))
        return z[1:] - z[0]

    with torch.no_grad():
        fns = [MixtureScore(sde, law) for law in laws]
        ref_logp = [
            law.log_prob(flow(f, x).double()).mean().item()
            for law, f, x in zip(laws, fns, x_laws, strict=True)
        ]
        targets = [flow(f, x) for f, x in objective]
        cache: dict[tuple, tuple[list[float], list[float]]] = {}

        def parts(u: list[float]) -> tuple[list[float], list[float]]:
            key = tuple(u)
            if key not in cache:
                times = schedule_times(sde, u, eps)
                gaps = [
                    law.log_prob(run(f, x, times).double()).mean().item() - r
                    for law, f, x, r in zip(laws, fns, x_laws, ref_logp, strict=True)
                ]
                errs = [
                    (run(f, x, times) - y).double().square().flatten(1).sum(1).mean().item()
                    for (f, x), y in zip(objective, targets, strict=True)
                ]
                if not all(math.isfinite(v) for v in (*gaps, *errs)):  # a diverged schedule
                    gaps, errs = [1e3] * len(gaps), [1e30] * len(errs)
                cache[key] = gaps, errs
            return cache[key]

        base = parts(lambda_positions(sde, get_grid("logsnr", sde, n, eps), eps))[1]

        def value(z) -> float:
            return sum(e / b for e, b in zip(parts(u_of(z))[1], base, strict=True))

        def slack(z):  # >= 0 where every |gap| <= tol
            gaps = np.asarray(parts(u_of(z))[0])
            return np.concatenate([tol - gaps, tol + gaps])

        steps_diff = np.eye(n - 1) - np.eye(n - 1, k=-1)  # z_i - z_{i-1}, with z_0 = 0
        limit = math.log(bound) * (1 - 1e-9)
        constraints = [
            NonlinearConstraint(slack, 0.0, np.inf),
            LinearConstraint(steps_diff, -limit, limit),
        ]

        def solve(z0) -> tuple[tuple, list[float]]:  # (rank: within the bounds first, end)
            result = minimize(
                value,
                z0,
                method="COBYQA",
                constraints=constraints,
                options=dict(maxfev=evals, initial_tr_radius=0.3, final_tr_radius=1e-3),
            )
            violation = max(0.0, -float(slack(result.x).min()))
            return (violation > 1e-3 * tol, violation, value(result.x)), u_of(result.x)

        best = None
        for name in ["given", *starts] if positions is not None else starts:
            u0 = (
                list(positions)
                if name == "given"
                else _within_ratio(lambda_positions(sde, get_grid(name, sde, n, eps), eps), bound)
            )
            rank, u = solve(z_of(u0))
            if best is None or rank < best[0]:
                best = (rank, u, name, u0)
        rng = np.random.default_rng(0)
        hop = 0
        for i in range(hops):  # basin hopping: restart from a perturbation of the best end
            rank, u = solve(z_of(best[1]) + rng.normal(0.0, 0.3, n - 1))
            if rank < best[0]:
                best, hop = (rank, u, *best[2:]), i + 1
        _, u, name, u0 = best
        start = parts(u0)
        gaps, errs = parts(u)
    info = {
        "gaps": gaps,
        "errors": errs,
        "start": name,
        "hop": hop,
        "start_gaps": start[0],
        "start_errors": start[1],
        "logsnr_errors": base,
    }
    return u, info


def _within_ratio(u: list[float], bound: float) -> list[float]:
    """u with neighbouring lambda-steps brought within `bound` of each other (a start the fit's
    ratio check accepts): each violating pair of log-steps moved towards its midpoint until it
    meets the bound, then the steps rescaled to span [0, 1]."""
    z = [math.log(b - a) for a, b in zip(u[:-1], u[1:], strict=True)]
    limit = math.log(bound) * (1 - 1e-9)
    for _ in range(10_000):
        moved = False
        for i in range(len(z) - 1):
            excess = abs(z[i + 1] - z[i]) - limit
            if excess > 0:
                shift = math.copysign(excess / 2, z[i + 1] - z[i])
                z[i] += shift
                z[i + 1] -= shift
                moved = True
        if not moved:
            break
    h = [math.exp(v) for v in z]
    return [0.0, *(sum(h[: i + 1]) / sum(h) for i in range(len(h) - 1)), 1.0]


def _report(what: str, info: dict) -> None:
    hop = f" (hop {info['hop']})" if info.get("hop") else ""
    log.info(
        f"  {what}, from {info['start']}{hop}: gaps "
        f"{' '.join(f'{v:.3f}' for v in info['start_gaps'])} -> "
        f"{' '.join(f'{v:.3f}' for v in info['gaps'])}, errors "
        f"{' '.join(f'{v:.3g}' for v in info['start_errors'])} -> "
        f"{' '.join(f'{v:.3g}' for v in info['errors'])}"
    )


def refit(
    seed: int = 0,
    n: int = 1000,
    images: dict[str, list[tuple[SDE, ScoreFn, tuple[int, ...]]]] | None = None,
    n_images: int = 128,
    n_gap: int = 4000,
    steps_list: list[int] | None = None,
    kinds: list[str] | None = None,
) -> dict[str, list[float]]:
    """Fit the schedules of FITTED_STEPS (or only `steps_list`, and only `kinds`, keeping the
    others of SCHEDULE_FILE, as it reads when the fit ends) and write SCHEDULE_FILE.

    Each kind's objective is the error to the reference flow on the exact scores of gmm8 and
    mix5d (n calibration points each) and, where images[kind] lists trained models of that kind,
    on each of those trained models (n_images prior draws each, weight `trained_weight(kind,
    steps)`), each batch's error divided by its error on the logSNR grid (optimise_grid's
    normalise=True). The shipped fit has two models per kind, the digits U-Net of the --digits bench
    (ch 16, 1000 steps) and an undertrained one (ch 8, 500 steps, batch 64): fitted to the first
    alone, fast was 46 from the flow of an undertrained VP model at 10 NFE where fixed grids reach
    2.6; fitted to both, 4.1 there and 9.8 on a held-out undertrained model (seed 1), but 37.0 on
    another (seed 2; LMS-Karras 28.6), so VP's 9-step entry is fitted to four models (also ch 8
    seed 1 and ch 24, 2000 steps) for UniPC-2 (1.37 there), its 14- and 19-step ones to three
    (iPNDM; at 15 NFE the UniPC-3 entry was 8.88 from that model's flow, LMS-Karras 8.11). A
    schedule fitted to the closed-form laws alone does not transfer to trained models: at 10 NFE
    on the trained digits U-Nets it was 2.5x (VP) to 90x (VE) further from the model's own flow
    than the joint fit, and at 20 NFE on an undertrained digits U-Net 10.5 against 0.06-0.14 for the
    logSNR and EDM grids (docs/fast-sampling.md).
    """

    sdes = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE()}
    trained: dict[str, list[tuple[ScoreFn, torch.Tensor]]] = {}  # kind -> [(model, prior draws)]
    for kind, loaded in (images or {}).items():
        for sde, model, shape in loaded:
            if repr(sde) != repr(sdes[kind]):
                raise ValueError(
                    f"a trained model has {sde!r}; the {kind} fit needs {sdes[kind]!r}"
                )
            g = torch.Generator().manual_seed(seed)
            trained.setdefault(kind, []).append(
                (model, sde.prior_sampling((n_images, *shape), generator=g))
            )
    out, with_trained, constrained, final = {}, set(), set(), {}
    todo = FITTED_STEPS if steps_list is None else steps_list
    for kind, steps in ((k, n) for k in kinds or sdes for n in todo):
        sde = sdes[kind]
        solver, options, _ = choose(sde, steps)
        laws = [gmm8(), mixture5d()]
        fns = [MixtureScore(sde, law) for law in laws]
        g = torch.Generator().manual_seed(seed)
        cal = [sde.prior_sampling((n, law.dim), generator=g).double() for law in laws]
        joint = kind in trained and trained_weight(kind, steps) > 0
        models = trained.get(kind, []) if joint else []
        fns += [m for m, _ in models]
        cal += [x for _, x in models]
        weights = [1.0, 1.0] + [trained_weight(kind, steps)] * len(models)
        _, info = optimise_grid(
            sde,
            fns,
            cal,
            SOLVERS[solver],
            steps,
            options=options,
            max_step_ratio=max_step_ratio(steps),
            normalise=joint,
            weights=weights if joint else None,
        )
        out[f"{kind}/{steps}"] = info["positions"]
        if joint:
            with_trained.add(f"{kind}/{steps}")
        log.info(
            f"{kind} steps={steps} {solver} {options}: objective {info['mse']:.3g} "
            f"(start {info['start']})"
        )
        g = torch.Generator().manual_seed(seed)
        x_laws = [sde.prior_sampling((n_gap, law.dim), generator=g).double() for law in laws]
        if steps in GAP_CONSTRAINED[kind]:
            objective = models if joint else list(zip(fns, cal, strict=True))
            u, gi = gap_constrained_fit(
                sde,
                steps,
                info["positions"],
                laws,
                x_laws,
                objective,
                starts=gap_starts(kind, steps),
            )
            out[f"{kind}/{steps}"] = u
            constrained.add(f"{kind}/{steps}")
            _report("gap-constrained", gi)
        if (kind, steps) in FINAL_STEP and joint:  # from uniform-t, with five basin hops
            u, gi = gap_constrained_fit(
                sde, steps, None, laws, x_laws, models, starts=("uniform",), hops=5, final_step=True
            )
            final[f"{kind}/{steps}"] = u
            _report(f"final step ({steps + 1} solver steps)", gi)
    record = {
        "fitted_on": f"exact scores of gmm8 + mix5d ({n} points each, calibration seed "
        f"{seed}); the entries of with_trained_models also {n_images} prior draws of each "
        "trained digits U-Net of the same kind given (shipped: python run.py mode=train "
        "sde=<kind> data=digits model=unet model.ch=16 training.steps=1000, and the same "
        "with model.ch=8 training.steps=500 training.batch_size=64; VP's 9-step entry also "
        "on the latter with seed=1 and on model.ch=24 training.steps=2000, its 14- and "
        "19-step entries also on the ch 24 one), weight "
        "trained_weight(kind, steps), each batch's error divided by its logSNR-grid error; "
        "eps=1e-3, denoise, neighbouring lambda-steps within max_step_ratio(steps); the "
        f"entries of gap_constrained then polished by gap_constrained_fit (tol {GAP_TOL}, "
        f"{n_gap} draws per law, calibration seed {seed}); those of final_step "
        "(steps + 1 solver steps, no denoising) by gap_constrained_fit from the uniform-t "
        "grid with five basin hops. "
        "Refit: python -m tasks.schedules refit --images vp=CKPT --images vp=CKPT2 "
        "--images subvp=CKPT ... [--steps 4-24] [--kinds vp,ve]",
        "positions": {},
    }
    if SCHEDULE_FILE.is_file():  # keep the entries not refitted now
        old = json.loads(SCHEDULE_FILE.read_text())
        record["positions"] = old["positions"]
        with_trained |= set(old.get("with_trained_models", [])) - set(out)
        constrained |= set(old.get("gap_constrained", [])) - set(out)
        final = {**old.get("final_step", {}), **final}
    merged = {**record["positions"], **out}
    record["positions"] = {k: merged[k] for k in sorted(merged, key=_order)}
    record["with_trained_models"] = sorted(with_trained, key=_order)
    record["gap_constrained"] = sorted(constrained, key=_order)
    record["final_step"] = {k: final[k] for k in sorted(final, key=_order)}
    SCHEDULE_FILE.write_text(json.dumps(record, indent=1) + "\n")
    return out
