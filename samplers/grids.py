"""Time grids for samplers, computed in float64 and kept apart from the solvers.

Every grid runs from T down to eps: (steps + 1,) float64, strictly decreasing, first T, last eps.
Grids that are uniform in some function of the noise level are mapped back to times by bisection,
using only the SDE's own `alpha_sigma`, so they hold for every SDE with a linear-Gaussian kernel.

Every sampler's `grid` option goes through `get_grid`, which takes one of the names in GRIDS, the
path of a schedule file written by `save_schedule` (e.g. by `python -m tasks.schedules fit`), or,
from Python, a 1-D sequence / tensor of times. A schedule file is JSON with at least
    {"times": [T, t_1, ..., t_{N-1}, eps], ...}
and is checked against the run: N must equal `steps`, the times must decrease strictly, start at
T, end at eps and lie inside (eps, T] in between.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from sde_lib import SDE


def uniform_grid(steps: int, T: float = 1.0, eps: float = 1e-3) -> torch.Tensor:
    """steps + 1 times from T down to eps, evenly spaced, float64: (steps + 1,)."""
    _check(steps, T, eps)
    return torch.linspace(T, eps, steps + 1, dtype=torch.float64)


def log_snr(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """Half log signal-to-noise ratio lambda(t) = log(alpha(t) / sigma(t)), (N,) float64."""
    alpha, sigma = sde.alpha_sigma(t.double())
    return alpha.log() - sigma.log()


def t_from_log_snr(sde: SDE, lam: torch.Tensor, T: float, eps: float) -> torch.Tensor:
    """Invert lambda(t) on [eps, T] by float64 bisection (lambda decreases in t): (N,) -> (N,)."""
    lam = lam.double()
    lo = torch.full_like(lam, eps)  # lambda(lo) >= lam
    hi = torch.full_like(lam, T)  # lambda(hi) <= lam
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = log_snr(sde, mid) > lam
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def logsnr_grid(sde: SDE, steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Times uniform in lambda = log(alpha / sigma) from T to eps (DPM-Solver, Lu et al. 2022)."""
    _check(steps, sde.T, eps)
    ends = log_snr(sde, torch.tensor([sde.T, eps], dtype=torch.float64))
    lam = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64)
    return _pin_ends(t_from_log_snr(sde, lam, sde.T, eps), sde.T, eps)


def edm_grid(sde: SDE, steps: int, eps: float = 1e-3, rho: float = 7.0) -> torch.Tensor:
    """Times with sigma/alpha spaced as in Karras et al. 2022 (EDM), eq. 5, with exponent rho."""
    _check(steps, sde.T, eps)
    ends = (-log_snr(sde, torch.tensor([sde.T, eps], dtype=torch.float64))).exp()  # sigma / alpha
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    s_max, s_min = ends[0] ** (1 / rho), ends[1] ** (1 / rho)
    noise = (s_max + ramp * (s_min - s_max)) ** rho
    return _pin_ends(t_from_log_snr(sde, -noise.log(), sde.T, eps), sde.T, eps)


def quadratic_grid(steps: int, T: float = 1.0, eps: float = 1e-3) -> torch.Tensor:
    """Times uniform in sqrt(t) from T to eps ("time-quadratic", DPM-Solver): (steps + 1,)."""
    _check(steps, T, eps)
    root = torch.linspace(math.sqrt(T), math.sqrt(eps), steps + 1, dtype=torch.float64)
    return _pin_ends(root.square(), T, eps)


GRIDS = ("uniform", "logsnr", "edm", "quadratic")
SCHEDULE_FORMAT = "scoresde-schedule"


def get_grid(
    name: str | Path | Sequence[float] | torch.Tensor, sde: SDE, steps: int, eps: float = 1e-3
) -> torch.Tensor:
    """The grid for `sde`: (steps + 1,) float64 from T to eps.

    `name` is one of GRIDS, the path of a JSON schedule file (see `load_schedule`), or a 1-D
    sequence / tensor of steps + 1 times checked like a file's.
    """
    if isinstance(name, str) and name in GRIDS:
        if name == "uniform":
            return uniform_grid(steps, sde.T, eps)
        if name == "logsnr":
            return logsnr_grid(sde, steps, eps)
        if name == "edm":
            return edm_grid(sde, steps, eps)
        return quadratic_grid(steps, sde.T, eps)
    if isinstance(name, (str, Path)):
        if str(name).endswith(".json") or Path(name).is_file():
            return load_schedule(name, sde, steps, eps)
        raise ValueError(
            f"unknown grid {name!r}; allowed: {', '.join(GRIDS)}, or the path of a .json schedule"
        )
    if isinstance(name, (torch.Tensor, Sequence)):
        _check(steps, sde.T, eps)
        return check_times(name, sde.T, eps, steps, "grid")
    allowed = ", ".join(GRIDS)
    raise ValueError(f"grid must be a name ({allowed}), a .json path or times; got {name!r}")


def check_times(
    times, T: float, eps: float, steps: int | None = None, what: str = "grid"
) -> torch.Tensor:
    """Validate a schedule's times: strictly decreasing, T first, eps last, inside (eps, T].

    Returns them as (N + 1,) float64 with the ends pinned exactly to T and eps (a relative
    difference of 1e-9 is tolerated, for values written to text). Raises ValueError naming `what`.
    """
    try:
        ts = torch.as_tensor(times, dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what}: the times must be a list of numbers, got {times!r}") from None
    if ts.ndim != 1 or ts.numel() < 2:
        shape = tuple(ts.shape)
        raise ValueError(f"{what}: need a flat list of at least 2 times, got shape {shape}")
    if not torch.isfinite(ts).all():
        raise ValueError(f"{what}: the times must be finite numbers")
    n = ts.numel() - 1
    if steps is not None and n != steps:
        raise ValueError(f"{what} has {n} steps ({n + 1} times) but steps={steps}; set steps={n}")
    if not (ts.diff() < 0).all():
        i = int((ts.diff() >= 0).nonzero()[0])
        raise ValueError(
            f"{what}: the times must decrease strictly from T to eps; "
            f"t[{i}]={ts[i].item()!r} <= t[{i + 1}]={ts[i + 1].item()!r}"
        )
    if abs(ts[0].item() - T) > 1e-9 * T or abs(ts[-1].item() - eps) > 1e-9 * max(eps, 1e-12):
        raise ValueError(
            f"{what}: the times must run from T={T} to eps={eps}, got {ts[0].item()!r} ... "
            f"{ts[-1].item()!r} (a schedule is fitted for one eps; refit it or set eps)"
        )
    inner = ts[1:-1]
    if ((inner <= eps) | (inner > T)).any():
        raise ValueError(f"{what}: the times must lie inside (eps, T] = ({eps}, {T}]")
    return _pin_ends(ts, T, eps)


def save_schedule(path: str | Path, times: torch.Tensor, **meta) -> Path:
    """Write a schedule file: {"format", "times": [T, ..., eps], "steps", **meta} as JSON."""
    ts = [float(v) for v in torch.as_tensor(times, dtype=torch.float64).tolist()]
    record = {"format": SCHEDULE_FORMAT, "steps": len(ts) - 1, "times": ts, **meta}
    path = Path(path)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_schedule(path: str | Path, sde: SDE, steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Read and check a schedule file for `sde`, `steps` and `eps`: (steps + 1,) float64."""
    _check(steps, sde.T, eps)
    what = f"grid file {str(path)!r}"
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what} is not a readable JSON schedule: {msg}") from None
    if not isinstance(record, dict) or not isinstance(record.get("times"), list):
        raise ValueError(f"{what} is not a schedule: need a JSON object with a list 'times'")
    return check_times(record["times"], sde.T, eps, steps, what)


class Step(NamedTuple):
    """One interval t -> s (t > s) of a grid with alpha and sigma at both ends, as Python floats."""

    t: float
    s: float
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float


def intervals(sde: SDE, ts: torch.Tensor, progress: bool = False) -> Iterator[Step]:
    """The consecutive intervals of a grid ts: (N + 1,), optionally with a tqdm bar.

    All coefficients are computed once, in float64, before the first step, so a sampler's loop
    touches only Python floats besides its tensors.
    """
    times = ts.double()
    alpha, sigma = (v.tolist() for v in sde.alpha_sigma(times))
    t = times.tolist()
    n = len(t) - 1
    steps = (Step(t[i], t[i + 1], alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]) for i in range(n))
    if progress:
        return iter(tqdm(steps, total=n))
    return steps


def _pin_ends(t: torch.Tensor, T: float, eps: float) -> torch.Tensor:
    t[0], t[-1] = T, eps
    return t


def _check(steps: int, T: float, eps: float) -> None:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < eps < T:
        raise ValueError(f"eps must lie in (0, T) = (0, {T}), got {eps!r}")


def schedule_times(sde: SDE, positions: list[float], eps: float) -> torch.Tensor:
    """Times (N + 1,) from positions u in [0, 1] of lambda between lambda(T) and lambda(eps)."""
    ends = log_snr(sde, torch.tensor([sde.T, eps], dtype=torch.float64)).tolist()
    lam = torch.tensor(positions, dtype=torch.float64) * (ends[1] - ends[0]) + ends[0]
    t = t_from_log_snr(sde, lam, sde.T, eps)
    t[0], t[-1] = sde.T, eps
    return t


def lambda_positions(sde: SDE, times: torch.Tensor, eps: float) -> list[float]:
    """Inverse of `schedule_times`: the positions in [0, 1] of lambda(times) between lambda(T)
    and lambda(eps)."""
    ends = log_snr(sde, torch.tensor([sde.T, eps], dtype=torch.float64)).tolist()
    return ((log_snr(sde, times.double()) - ends[0]) / (ends[1] - ends[0])).tolist()
