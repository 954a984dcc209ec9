"""`sampler=fast`: the measured-best solver, time grid and final-step policy per kind of SDE.

The kind is read from the SDE's coefficients alone (no isinstance): alpha(T) = 1 is variance
exploding ("ve"), alpha^2 + sigma^2 = 1 variance preserving ("vp"), any other decaying alpha
"subvp". For each kind and every step count in FITTED_STEPS (4..24 steps: 5..25 NFE with the
final denoising; the solver choices were measured at 9 and 19) fast uses a schedule fitted by
`optimise_grid` to the exact scores of gmm8 and the 5-D mixture together and, for the entries
listed under "with_trained_models" in the file, to a trained digits U-Net of that kind as well
(see `refit`); the 9-step (10-NFE) schedules, and sub-VP's and VE's 19-step ones, are then
polished by `gap_constrained_fit` (GAP_CONSTRAINED), which
holds the mixtures' mean exact log-density within GAP_TOL of their reference flow's while it
minimises the trained model's error. The schedules are stored as positions in lambda between
lambda(T) and lambda(eps), so they map onto any eps and any SDE of that kind. Other step counts
use the solver of the nearest measured count on the time-quadratic grid. For a trained model,
grid="fit" (sampler.grid=fit) fits the steps to that model instead. README "Fast sampling" has the
figures; refit with
    python -m samplers.fast --refit --images vp=CKPT --images subvp=CKPT --images ve=CKPT
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sde_lib import SDE, ScoreFn

from .grids import get_grid, lambda_positions, schedule_times
from .ipndm import sample_ipndm
from .unipc import sample_unipc

SCHEDULE_FILE = Path(__file__).with_name("fast_schedules.json")
SOLVERS = {"unipc": sample_unipc, "ipndm": sample_ipndm}
# (kind, steps) -> (solver, options), measured on held-out batches (README "Fast sampling")
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
# against 0.70 for UniPC, both within the gap bound
GAP_CONSTRAINED_SOLVER: dict[tuple[str, int], tuple[str, dict]] = {
    ("subvp", 9): ("unipc", dict(lower_order_final=True)),
}


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


def sample_fast(
    sde: SDE,
    score_fn: ScoreFn,
    x: torch.Tensor,
    *,
    steps: int = 19,
    eps: float = 1e-3,
    solver: str = "auto",
    grid: str | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The fast default: x_T (B, *D) -> x_eps (B, *D) in `steps` score evaluations.

    With the final denoising of `sample`, NFE = steps + 1: steps=9 is the 10-NFE setting and the
    default 19 the 20-NFE one. solver="auto" takes the measured choice of `choose`; "unipc" or
    "ipndm" force that solver (with the same grid). grid=None takes the fitted schedule (else the
    time-quadratic grid); any other value is a grid as for every sampler (a name of GRIDS or a
    .json schedule). `generator` is unused (deterministic).
    """
    allowed = ("auto", *SOLVERS)
    if solver not in allowed:
        raise ValueError(f"unknown solver {solver!r} for sampler 'fast'; allowed: "
                         f"{', '.join(allowed)}")  # fmt: skip
    name, options, positions = choose(sde, steps)
    if solver != "auto":
        name = solver
        options = {}
    if grid is None:
        grid = "quadratic" if positions is None else schedule_times(sde, positions, eps)
    grid = get_grid(grid, sde, steps, eps)
    return SOLVERS[name](sde, score_fn, x, steps=steps, eps=eps, grid=grid, progress=progress,
                         **options)  # fmt: skip


_CACHE: dict[str, list[float]] | None = None


def _order(key: str) -> tuple[int, int]:
    """Sort key of a schedule entry "kind/steps"."""
    kind, steps = key.split("/")
    return ("vp", "subvp", "ve").index(kind), int(steps)


def _schedules() -> dict[str, list[float]]:
    global _CACHE
    if _CACHE is None:
        _CACHE = json.loads(SCHEDULE_FILE.read_text())["positions"] if SCHEDULE_FILE.is_file() \
            else {}  # fmt: skip
    return _CACHE


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
# and the bound on each law's paired gap there. VP at 19 steps is within 0.02 of the mixtures and
# first on its digits model without it.
GAP_CONSTRAINED = {"vp": (9,), "subvp": (9, 19), "ve": (9, 19)}
GAP_TOL = 0.01


def gap_constrained_fit(
    sde: SDE,
    steps: int,
    positions: list[float],
    laws: list,
    x_laws: list[torch.Tensor],
    objective: list[tuple[ScoreFn, torch.Tensor]],
    *,
    tol: float = GAP_TOL,
    eps: float = 1e-3,
    penalties: tuple[float, ...] = (1e2, 1e3, 1e4, 1e5),
    evals: int = 400,
    starts: tuple[str, ...] = (),
) -> tuple[list[float], dict]:
    """Polish schedule positions so that the exact mixtures' log-density gaps stay within tol.

    The squared distance to the reference flow, which `optimise_grid` minimises, barely sees a
    small systematic change of each component's spread, and the mean log-density is first-order
    sensitive to it: a 3.5 % spread error on gmm8 is a gap of 0.07 at a squared error of 2e-4.
    Here the objective is the (logSNR-normalised) squared error of the `objective` batches
    (score, prior draws), e.g. a trained model's, plus penalty * sum over the laws of
    max(0, |gap| - tol)^2, where gap is the mean exact log-density of fast's denoised output from
    x_laws minus that of the reference flow from the same draws (paired, so without the sampling
    noise of a comparison with fresh data). Nelder-Mead over the log lambda-increments, from
    `positions` and from each fixed grid named in `starts` (blended towards uniform lambda steps
    until it meets the step-ratio bound: `_within_ratio`), once per penalty in increasing order,
    `evals` evaluations each; schedules that break max_step_ratio(steps) are rejected, and the
    start with the lowest final objective wins. Returns (positions, info with the gaps, errors
    and the winning start).
    """
    import numpy as np
    from scipy.optimize import minimize

    from models.exact import MixtureScore

    from .optimise_grid import _denoise, reference

    solver, options, _ = choose(sde, steps)
    sampler = SOLVERS[solver]

    def run(score_fn, x, times):
        return _denoise(sde, score_fn, sampler(sde, score_fn, x.clone(), steps=steps, eps=eps,
                                               grid=times, **options), eps)  # fmt: skip

    def flow(score_fn, x):
        return _denoise(sde, score_fn, reference(sde, score_fn, x, eps, 100, 4)[1][-1], eps)

    with torch.no_grad():
        fns = [MixtureScore(sde, law) for law in laws]
        ref_logp = [law.log_prob(flow(f, x).double()).mean().item()
                    for law, f, x in zip(laws, fns, x_laws, strict=True)]  # fmt: skip
        targets = [flow(f, x) for f, x in objective]

        def parts(u: list[float]) -> tuple[list[float], list[float]]:
            times = schedule_times(sde, u, eps)
            gaps = [law.log_prob(run(f, x, times).double()).mean().item() - r
                    for law, f, x, r in zip(laws, fns, x_laws, ref_logp, strict=True)]  # fmt: skip
            errs = [(run(f, x, times) - y).double().square().flatten(1).sum(1).mean().item()
                    for (f, x), y in zip(objective, targets, strict=True)]  # fmt: skip
            return gaps, errs

        base = parts(lambda_positions(sde, get_grid("logsnr", sde, steps, eps), eps))[1]
        bound = max_step_ratio(steps)

        def u_of(z) -> list[float]:
            inc = np.exp(z - z.max())
            return [0.0, *np.cumsum(inc / inc.sum())[:-1].tolist(), 1.0]

        def loss(z, penalty: float) -> float:
            u = u_of(z)
            h = np.diff(u)
            if max((h[1:] / h[:-1]).max(), (h[:-1] / h[1:]).max()) > bound:
                return 1e9
            gaps, errs = parts(u)
            value = sum(e / b for e, b in zip(errs, base, strict=True)) + penalty * sum(
                max(0.0, abs(g) - tol) ** 2 for g in gaps)  # fmt: skip
            return value if math.isfinite(value) else 1e9

        best = None
        for name in ["given", *starts]:
            u0 = list(positions) if name == "given" else _within_ratio(lambda_positions(
                sde, get_grid(name, sde, steps, eps), eps), bound)  # fmt: skip
            z = np.log(np.diff(np.asarray(u0, dtype=np.float64)))
            for penalty in penalties:
                result = minimize(loss, z, args=(penalty,), method="Nelder-Mead",
                                  options=dict(maxfev=evals, xatol=1e-4, fatol=1e-7,
                                               adaptive=True))  # fmt: skip
                z = result.x
            if best is None or result.fun < best[0]:
                best = (result.fun, u_of(z), name, u0)
        _, u, name, u0 = best
        start = parts(u0)
        gaps, errs = parts(u)
    info = {"gaps": gaps, "errors": errs, "start": name, "start_gaps": start[0],
            "start_errors": start[1], "logsnr_errors": base}  # fmt: skip
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


def refit(
    seed: int = 0,
    n: int = 1000,
    images: dict[str, str] | None = None,
    n_images: int = 128,
    n_gap: int = 4000,
    steps_list: list[int] | None = None,
    kinds: list[str] | None = None,
) -> dict[str, list[float]]:
    """Fit the schedules of FITTED_STEPS (or only `steps_list`, and only `kinds`, keeping the
    others of SCHEDULE_FILE, as it reads when the fit ends) and write SCHEDULE_FILE.

    Each kind's objective is the error to the reference flow on the exact scores of gmm8 and
    mix5d (n calibration points each) and, where images[kind] names a checkpoint of that kind,
    on that trained model (n_images prior draws, weight `trained_weight(kind, steps)`), each batch's
    error divided by its error on the logSNR grid (optimise_grid's normalise=True). A schedule
    fitted to the closed-form laws alone does not transfer to trained models: at 10 NFE on the
    trained digits U-Nets it was 2.5x (VP) to 90x (VE) further from the model's own flow than the
    joint fit, and at 20 NFE on an undertrained digits U-Net 10.5 against 0.06-0.14 for the
    logSNR and EDM grids (README "Fast sampling").
    """
    from data.mixtures import gmm8, mixture5d
    from models.exact import MixtureScore
    from sde_lib import VESDE, VPSDE, subVPSDE

    from .optimise_grid import _from_checkpoint, optimise_grid

    images = dict(images or {})
    sdes = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE()}
    trained = {}
    for kind, path in images.items():
        sde, model, shape, _ = _from_checkpoint(Path(path))
        if repr(sde) != repr(sdes[kind]):
            raise ValueError(f"{path} has {sde!r}; the {kind} fit needs {sdes[kind]!r}")
        x = sde.prior_sampling((n_images, *shape), generator=torch.Generator().manual_seed(seed))
        trained[kind] = (sde, model, x)
    out, with_trained, constrained = {}, set(), set()
    todo = FITTED_STEPS if steps_list is None else steps_list
    for kind, steps in ((k, n) for k in kinds or sdes for n in todo):
        sde = sdes[kind]
        solver, options, _ = choose(sde, steps)
        laws = [gmm8(), mixture5d()]
        fns = [MixtureScore(sde, law) for law in laws]
        g = torch.Generator().manual_seed(seed)
        cal = [sde.prior_sampling((n, law.dim), generator=g).double() for law in laws]
        joint = kind in trained and trained_weight(kind, steps) > 0
        if joint:
            fns.append(trained[kind][1])
            cal.append(trained[kind][2])
        _, info = optimise_grid(sde, fns, cal, SOLVERS[solver], steps, options=options,
                                max_step_ratio=max_step_ratio(steps), normalise=joint,
                                weights=[1.0, 1.0, trained_weight(kind, steps)] if joint else None,
                                )  # fmt: skip
        out[f"{kind}/{steps}"] = info["positions"]
        if joint:
            with_trained.add(f"{kind}/{steps}")
        print(f"{kind} steps={steps} {solver} {options}: objective {info['mse']:.3g} "
              f"(start {info['start']})", flush=True)  # fmt: skip
        if steps in GAP_CONSTRAINED[kind]:
            g = torch.Generator().manual_seed(seed)
            x_laws = [sde.prior_sampling((n_gap, law.dim), generator=g).double() for law in laws]
            objective = [trained[kind][1:]] if joint else list(zip(fns, cal, strict=True))
            u, gi = gap_constrained_fit(sde, steps, info["positions"], laws, x_laws, objective,
                                        starts=("uniform",) if steps <= 12 else ())  # fmt: skip
            out[f"{kind}/{steps}"] = u
            constrained.add(f"{kind}/{steps}")
            print(f"  gap-constrained: gaps {' '.join(f'{v:.3f}' for v in gi['start_gaps'])} -> "
                  f"{' '.join(f'{v:.3f}' for v in gi['gaps'])}, errors "
                  f"{' '.join(f'{v:.3g}' for v in gi['start_errors'])} -> "
                  f"{' '.join(f'{v:.3g}' for v in gi['errors'])}", flush=True)  # fmt: skip
    record = {"fitted_on": f"exact scores of gmm8 + mix5d ({n} points each, calibration seed "
              f"{seed}); the entries of with_trained_models also {n_images} prior draws of a "
              "trained digits U-Net of the same kind (python run.py mode=train sde=<kind> "
              "data=digits model=unet model.ch=16 training.steps=1000), weight "
              "trained_weight(kind, steps), each batch's error divided by its logSNR-grid error; "
              "eps=1e-3, denoise, neighbouring lambda-steps within max_step_ratio(steps); the "
              f"entries of gap_constrained then polished by gap_constrained_fit (tol {GAP_TOL}, "
              f"{n_gap} draws per law, calibration seed {seed}). "
              "Refit: python -m samplers.fast --refit --images vp=CKPT --images subvp=CKPT "
              "--images ve=CKPT [--steps 4-24] [--kinds vp,ve]", "positions": {}}  # fmt: skip
    if SCHEDULE_FILE.is_file():  # keep the entries not refitted now
        old = json.loads(SCHEDULE_FILE.read_text())
        record["positions"] = old["positions"]
        with_trained |= set(old.get("with_trained_models", [])) - set(out)
        constrained |= set(old.get("gap_constrained", [])) - set(out)
    merged = {**record["positions"], **out}
    record["positions"] = {k: merged[k] for k in sorted(merged, key=_order)}
    record["with_trained_models"] = sorted(with_trained, key=_order)
    record["gap_constrained"] = sorted(constrained, key=_order)
    SCHEDULE_FILE.write_text(json.dumps(record, indent=1) + "\n")
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m samplers.fast")
    p.add_argument("--refit", action="store_true", help="refit the shipped schedules")
    p.add_argument("--images", action="append", default=[], metavar="KIND=CKPT",
                   help="a trained model of that SDE kind (vp, subvp, ve) to fit on as well")
    p.add_argument("--steps", default=None, help="only these step counts, e.g. 4-12 or 9,19")
    p.add_argument("--kinds", default=None, help="only these kinds, e.g. vp,ve")
    a = p.parse_args()
    if a.refit:
        torch.set_num_threads(1)
        todo = None
        if a.steps:
            todo = [int(v) for v in a.steps.split(",")] if "-" not in a.steps else list(
                range(int(a.steps.split("-")[0]), int(a.steps.split("-")[1]) + 1))  # fmt: skip
        refit(images=dict(v.split("=", 1) for v in a.images), steps_list=todo,
              kinds=a.kinds.split(",") if a.kinds else None)  # fmt: skip

