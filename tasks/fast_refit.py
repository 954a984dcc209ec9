"""Refit the table of `sampler=fast`'s defaults (samplers/fast_table.json) from its own recipes.

    python -m tasks.schedules refit --out my_table.json --images vp=CKPT --images vp=CKPT2 ...

Every entry of the base table carries the recipe of its fit ("fit"): the trained models' weight,
the bound on neighbouring lambda-steps and, for the gap-constrained entries, the log-density
tolerance and the fixed grids the constrained fit starts from. A refit keeps each entry's solver
and recipe, fits its positions again and writes a complete table to a file of the user's; the
installed package is never written. `sampler=fast sampler.grid=my_table.json` then samples with
it. Two fits make an entry (docs/fast-sampling.md says why each is there):

1. `optimise_grid` on the exact scores of gmm8 and mix5d together and, with the entry's
   trained_weight > 0, on each trained model given for its kind, each batch's error divided by
   its error on the logSNR grid, within the entry's step-ratio bound;
2. for entries with a gap_tol, `gap_constrained_fit`: the trained models' error minimised with
   each mixture's paired exact log-density gap held within gap_tol (and the final_step entry,
   which replaces the denoising by one more solver step, fitted the same way).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import LinearConstraint, NonlinearConstraint, minimize

from data.mixtures import gmm8, mixture5d
from models.exact import MixtureScore
from samplers.exponential import tweedie_denoise
from samplers.fast import KINDS, SOLVERS, TABLE_FILE, load_table, sde_kind
from samplers.grids import get_grid, lambda_positions, schedule_times
from samplers.optimise_grid import optimise_grid, reference
from sde_lib import SDE, VESDE, VPSDE, ScoreFn, subVPSDE
from sde_lib.io import atomic_write_text

log = logging.getLogger(__name__)
KIND_SDES = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}  # the SDE of each kind, as shipped


def gap_constrained_fit(
    sde: SDE,
    steps: int,
    solver: tuple[str, dict],
    positions: list[float] | None,
    laws: list,
    x_laws: list[torch.Tensor],
    objective: list[tuple[ScoreFn, torch.Tensor]],
    *,
    tol: float = 0.01,
    bound: float = 3.0,
    eps: float = 1e-3,
    evals: int = 600,
    starts: tuple[str, ...] = (),
    hops: int = 0,
    denoise: bool = True,
) -> tuple[list[float], dict]:
    """Positions of `steps` steps of `solver` (name, options) that minimise the objective's error
    with every law's paired log-density gap within tol.

    The objective is the sum over the `objective` batches (score, prior draws) of the squared
    distance of the solver's output (denoised unless denoise=False) to that score's reference
    flow, each divided by its value on the logSNR grid. The gap of a law is the mean exact
    log-density of the solver's output from x_laws minus that of the reference flow from the same
    draws: paired, so free of the noise of a comparison with fresh data. Constraints: |gap| <= tol
    per law and neighbouring lambda-steps within a factor `bound` (linear in the log-steps).
    Solved by COBYQA (scipy's derivative-free trust-region SQP), `evals` evaluations each from
    `positions` (if given) and from every fixed grid in `starts` (brought within the bound by
    `within_ratio`), then `hops` restarts from the best end with its log-steps perturbed by
    N(0, 0.3^2) (seeded: the objective has many local minima). The best end within the
    constraints wins. Returns (positions, info: gaps, errors, the winning start, the hop that
    ended it (0: none), the start's gaps and errors, the logSNR grid's errors).
    """
    name, options = solver
    sampler = SOLVERS[name]

    def run(score_fn, x, times):
        y = sampler(sde, score_fn, x.clone(), steps=steps, eps=eps, grid=times, **options)
        return tweedie_denoise(sde, score_fn, y, eps) if denoise else y

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

        base = parts(lambda_positions(sde, get_grid("logsnr", sde, steps, eps), eps))[1]

        def value(z) -> float:
            return sum(e / b for e, b in zip(parts(u_of(z))[1], base, strict=True))

        def slack(z):  # >= 0 where every |gap| <= tol
            gaps = np.asarray(parts(u_of(z))[0])
            return np.concatenate([tol - gaps, tol + gaps])

        steps_diff = np.eye(steps - 1) - np.eye(steps - 1, k=-1)  # z_i - z_{i-1}, with z_0 = 0
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
                else within_ratio(
                    lambda_positions(sde, get_grid(name, sde, steps, eps), eps), bound
                )
            )
            rank, u = solve(z_of(u0))
            if best is None or rank < best[0]:
                best = (rank, u, name, u0)
        rng = np.random.default_rng(0)
        hop = 0
        for i in range(hops):  # basin hopping: restart from a perturbation of the best end
            rank, u = solve(z_of(best[1]) + rng.normal(0.0, 0.3, steps - 1))
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


def within_ratio(u: list[float], bound: float) -> list[float]:
    """u with neighbouring lambda-steps brought within `bound` of each other (a start the fit's
    ratio constraint accepts): each violating pair of log-steps moved towards its midpoint until
    it meets the bound, then the steps rescaled to span [0, 1]."""
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
    out: Path,
    images: dict[str, list[tuple[SDE, ScoreFn, tuple[int, ...]]]] | None = None,
    *,
    base: Path = TABLE_FILE,
    keys: list[str] | None = None,
    evals: int = 600,
) -> dict[str, dict]:
    """Refit the entries `keys` ("kind/steps"; default all) of the table `base` by their recipes
    and write the whole table, the others unchanged, to `out` (atomically; never the package's
    own file). images[kind]: the trained models (sde, score, data shape) of that kind; an entry
    whose recipe gives trained models a weight is fitted on them (and refused without them).
    Returns the refitted entries."""
    out = Path(out)
    if out.resolve() == TABLE_FILE.resolve():
        raise ValueError(f"refit writes a table of yours, not the package's {TABLE_FILE}")
    record = json.loads(Path(base).read_text())
    entries = copy.deepcopy(dict(load_table(base)))
    cal = record.get("calibration", {})
    seed, n = int(cal.get("seed", 0)), int(cal.get("exact_points", 1000))
    n_images, n_gap = int(cal.get("image_draws", 128)), int(cal.get("gap_draws", 4000))
    eps = float(cal.get("eps", 1e-3))
    sdes = {kind: cls() for kind, cls in KIND_SDES.items()}
    trained: dict[str, list[tuple[ScoreFn, torch.Tensor]]] = {}  # kind -> [(model, prior draws)]
    for kind, loaded in (images or {}).items():
        if kind not in KINDS:
            raise ValueError(f"unknown SDE kind {kind!r}; allowed: {', '.join(KINDS)}")
        for sde, model, shape in loaded:
            if sde_kind(sde) != kind or repr(sde) != repr(sdes[kind]):
                raise ValueError(
                    f"a trained model has {sde!r}; the {kind} fit needs {sdes[kind]!r}"
                )
            g = torch.Generator().manual_seed(seed)
            trained.setdefault(kind, []).append(
                (model, sde.prior_sampling((n_images, *shape), generator=g))
            )
    todo = keys if keys is not None else list(entries)
    for key in todo:
        if key not in entries:
            raise ValueError(f"{base} has no entry {key!r}")
        kind, steps = key.split("/")[0], int(key.split("/")[1])
        recipe = entries[key].get("fit", {})
        weight = float(recipe.get("trained_weight", 0.0))
        if weight > 0 and kind not in trained:
            raise ValueError(
                f"entry {key} is fitted with trained {kind} models: pass --images {kind}=CKPT"
            )
        entries[key] = _refit_entry(
            sdes[kind], steps, entries[key], trained.get(kind, []) if weight > 0 else [],
            weight, seed, n, n_gap, eps, evals,
        )  # fmt: skip
    record["entries"] = entries
    record["refitted"] = {"base": str(base), "entries": todo}
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    return {k: entries[k] for k in todo}


def _refit_entry(sde, steps, entry, models, weight, seed, n, n_gap, eps, evals) -> dict:
    """One entry refitted by its recipe (see the module docstring)."""
    recipe = entry.get("fit", {})
    solver = (entry["solver"], dict(entry["options"]))
    bound = float(recipe.get("max_step_ratio", 3.0 if steps <= 12 else 6.0))
    laws = [gmm8(), mixture5d()]
    fns = [MixtureScore(sde, law) for law in laws]
    g = torch.Generator().manual_seed(seed)
    cal = [sde.prior_sampling((n, law.dim), generator=g).double() for law in laws]
    joint = bool(models)
    weights = [1.0, 1.0] + [weight] * len(models)
    _, info = optimise_grid(
        sde,
        fns + [m for m, _ in models],
        cal + [x for _, x in models],
        SOLVERS[solver[0]],
        steps,
        eps=eps,
        options=solver[1],
        max_step_ratio=bound,
        normalise=joint,
        weights=weights if joint else None,
    )
    new = dict(entry, positions=info["positions"])
    log.info(
        f"{sde_kind(sde)}/{steps} {solver}: objective {info['mse']:.3g} (start {info['start']})"
    )
    if "gap_tol" not in recipe and "final_step" not in entry:
        return new
    g = torch.Generator().manual_seed(seed)
    x_laws = [sde.prior_sampling((n_gap, law.dim), generator=g).double() for law in laws]
    objective = models if joint else list(zip(fns, cal, strict=True))
    if "gap_tol" in recipe:
        u, gi = gap_constrained_fit(
            sde, steps, solver, info["positions"], laws, x_laws, objective,
            tol=float(recipe["gap_tol"]), bound=bound, eps=eps, evals=evals,
            starts=tuple(recipe.get("gap_starts", ())),
        )  # fmt: skip
        new["positions"] = u
        _report("gap-constrained", gi)
    if "final_step" in entry:  # one more solver step in place of the denoising
        final = entry["final_step"]
        r = final.get("fit", {})
        u, gi = gap_constrained_fit(
            sde, steps + 1, (final["solver"], dict(final["options"])), None, laws, x_laws,
            objective, tol=float(r.get("gap_tol", 0.01)), bound=float(r.get("max_step_ratio", 6.0)),
            eps=eps, evals=evals, starts=tuple(r.get("gap_starts", ("uniform",))),
            hops=int(r.get("hops", 0)), denoise=False,
        )  # fmt: skip
        new["final_step"] = dict(final, positions=u)
        _report(f"final step ({steps + 1} solver steps)", gi)
    return new
