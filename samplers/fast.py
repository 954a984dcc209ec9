"""`sampler=fast`: the measured-best solver, time grid and final-step policy per kind of SDE.

The kind is read from the SDE's coefficients alone (no isinstance): alpha(T) = 1 is variance
exploding ("ve"), alpha^2 + sigma^2 = 1 variance preserving ("vp"), any other decaying alpha
"subvp". For each kind and every step count in FITTED_STEPS (4..24 steps: 5..25 NFE with the
final denoising; the solver choices were measured at 9 and 19) fast uses a schedule fitted by
`optimise_grid` to the exact scores of gmm8 and the 5-D mixture together (calibration seed 0,
1000 points each), stored as positions in lambda between lambda(T) and lambda(eps), so it maps
onto any eps and any SDE of that kind. Other step counts use the solver of the nearest measured
count on the time-quadratic grid. README "Fast sampling" has the figures; refit with
    python -m samplers.fast --refit
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sde_lib import SDE, ScoreFn

from .grids import get_grid, log_snr, t_from_log_snr
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
    the final steps are always lower order (the stable choice without a measurement).
    """
    kind = sde_kind(sde)
    fitted = sorted(n for k, n in CHOICES if k == kind)
    nearest = min(fitted, key=lambda n: (abs(n - steps), n))
    solver, options = CHOICES[(kind, nearest)]
    if steps != nearest:
        options = dict(options, lower_order_final=True)
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


def schedule_times(sde: SDE, positions: list[float], eps: float) -> torch.Tensor:
    """Times (N + 1,) from positions u in [0, 1] of lambda between lambda(T) and lambda(eps)."""
    ends = log_snr(sde, torch.tensor([sde.T, eps], dtype=torch.float64)).tolist()
    lam = torch.tensor(positions, dtype=torch.float64) * (ends[1] - ends[0]) + ends[0]
    t = t_from_log_snr(sde, lam, sde.T, eps)
    t[0], t[-1] = sde.T, eps
    return t


_CACHE: dict[str, list[float]] | None = None


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


def refit(seed: int = 0, n: int = 1000) -> dict[str, list[float]]:
    """Fit every schedule of CHOICES (exact scores of gmm8 and mix5d) and write SCHEDULE_FILE."""
    from data.mixtures import gmm8, mixture5d
    from models.exact import MixtureScore
    from sde_lib import VESDE, VPSDE, subVPSDE

    from .optimise_grid import optimise_grid

    sdes = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE()}
    out = {}
    for kind, steps in ((k, n) for k in sdes for n in FITTED_STEPS):
        sde = sdes[kind]
        solver, options, _ = choose(sde, steps)
        laws = [gmm8(), mixture5d()]
        fns = [MixtureScore(sde, law) for law in laws]
        g = torch.Generator().manual_seed(seed)
        cal = [sde.prior_sampling((n, law.dim), generator=g).double() for law in laws]
        _, info = optimise_grid(sde, fns, cal, SOLVERS[solver], steps, options=options,
                                max_step_ratio=max_step_ratio(steps))  # fmt: skip
        out[f"{kind}/{steps}"] = info["positions"]
        print(f"{kind} steps={steps} {solver} {options}: mse {info['mse']:.3g} "
              f"(start {info['start']})", flush=True)  # fmt: skip
    record = {"fitted_on": "exact scores of gmm8 + mix5d, eps=1e-3, denoise, seed "
              f"{seed}, {n} points each, neighbouring lambda-steps within a factor 3 "
              "(<= 12 steps) or 6", "positions": out}  # fmt: skip
    SCHEDULE_FILE.write_text(json.dumps(record, indent=1) + "\n")
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m samplers.fast")
    p.add_argument("--refit", action="store_true", help="refit the shipped schedules")
    if p.parse_args().refit:
        torch.set_num_threads(1)
        refit()

