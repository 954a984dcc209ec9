"""`sampler=fast`: the solver and time schedule that measured best for the kind of SDE and budget.

The defaults are data, not code: `fast_table.json` next to this file holds one entry per kind
("vp", "subvp", "ve") and step count 4..24 with

    solver, options   UniPC or iPNDM and their options
    positions         the schedule as positions in lambda = log(alpha/sigma), 0 at T and 1 at
                      eps, so that it maps onto any eps and any SDE of the kind
    final_step        (optional) with denoise=True, the final evaluation is one more solver step
                      on its own (steps + 1)-step schedule instead of Tweedie's denoising
    provenance, fit   one line on what it was fitted to, and the recipe that refits it

Other step counts take the nearest entry's solver with lower-order final steps on the
time-quadratic grid. The kind is read from the SDE's coefficients (no isinstance), so VDM's
learned schedule counts as VP. docs/fast-sampling.md has the measurements behind every entry;
`python -m tasks.schedules refit --out FILE` refits the table into a file that
`sampler.grid=FILE` uses in place of the shipped one.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import torch

from sde_lib import SDE, ScoreFn
from sde_lib.options import Choice

from .exponential import tweedie_denoise
from .grids import get_grid, schedule_times
from .ipndm import sample_ipndm
from .unipc import sample_unipc

TABLE_FILE = Path(__file__).with_name("fast_table.json")
SOLVERS = {"unipc": sample_unipc, "ipndm": sample_ipndm}
KINDS = ("vp", "subvp", "ve")
# sample_fast's options and their allowed values (run.py's validation reads them too)
RULES = {"solver": Choice("auto", *SOLVERS)}


def sde_kind(sde: SDE) -> str:
    """'ve' where alpha(t) = 1, 'vp' where alpha^2 + sigma^2 = 1, else 'subvp'."""
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64) * sde.T
    alpha, sigma = sde.alpha_sigma(t)
    if torch.allclose(alpha, torch.ones_like(alpha), rtol=0, atol=1e-9):
        return "ve"
    if torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=0, atol=1e-6):
        return "vp"
    return "subvp"


def is_table(grid) -> bool:
    """Whether a grid argument names a table file of fast's format (a JSON object with
    "entries"), as `tasks.schedules refit` writes, rather than one schedule."""
    if not isinstance(grid, str | Path) or not str(grid).endswith(".json"):
        return False
    try:
        return "entries" in json.loads(Path(grid).read_text())
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def load_table(path: str | Path = TABLE_FILE) -> dict[str, dict]:
    """The entries of a table file, checked: {"kind/steps": entry}. ValueError names the first
    malformed entry. The caller owns the result: editing it changes no later read."""
    return copy.deepcopy(_read_table(*_file_key(path)))


def _file_key(path: str | Path) -> tuple[str, int]:
    """The cache key of a table file: its path and modification time, so that a file rewritten
    in place (a refit into the same --out) is parsed again."""
    try:
        return str(path), Path(path).stat().st_mtime_ns
    except OSError:
        return str(path), -1


@lru_cache(maxsize=8)
def _read_table(path: str, mtime_ns: int) -> dict[str, dict]:
    try:
        entries = json.loads(Path(path).read_text())["entries"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a table of sampler=fast's defaults ({e})") from None
    for key, entry in entries.items():
        kind, _, steps = key.partition("/")
        for e, extra in ((entry, 1), (entry.get("final_step"), 2)):  # final_step: 1 more step
            if e is None:
                continue
            ok = kind in KINDS and steps.isdigit() and e.get("solver") in SOLVERS
            ok = ok and isinstance(e.get("options"), dict)
            positions = e.get("positions")
            if ok and positions is not None:
                ok = len(positions) == int(steps) + extra
                ok = ok and all(b > a for a, b in zip(positions[:-1], positions[1:], strict=True))
                ok = ok and positions[0] == 0.0 and positions[-1] == 1.0
            if not ok:
                raise ValueError(
                    f"{path}: entry {key!r} is malformed (want kind/steps with kind in "
                    f"{'|'.join(KINDS)}, a solver in {'|'.join(SOLVERS)} and steps + 1 "
                    "increasing positions from 0 to 1)"
                )
    return entries


def entry(sde: SDE, steps: int, table: str | Path = TABLE_FILE) -> dict:
    """The table's entry for sde's kind and steps: {"solver", "options", "positions" (None: the
    time-quadratic grid), optionally "final_step"}. Away from the table's step counts: the
    nearest entry's solver, with lower-order final steps (the stable choice without a
    measurement), on the time-quadratic grid."""
    kind = sde_kind(sde)
    entries = _read_table(*_file_key(table))
    if f"{kind}/{steps}" in entries:
        return copy.deepcopy(entries[f"{kind}/{steps}"])
    counts = sorted(int(k.split("/")[1]) for k in entries if k.startswith(f"{kind}/"))
    if not counts:
        raise ValueError(f"{table} has no entry for a {kind} SDE")
    near = entries[f"{kind}/{min(counts, key=lambda n: (abs(n - steps), n))}"]
    options = dict(near["options"], lower_order_final=True)
    return {"solver": near["solver"], "options": options, "positions": None}


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
    """x_T (B, *D) -> x_0 (B, *D) in steps (+ 1 with denoise) evaluations.

    `sample` passes denoise=True by default, so NFE = steps + 1 there: steps=9 is the 10-NFE
    setting and the default 19 the 20-NFE one. With denoise, the final evaluation is the entry's
    final_step where it has one, else Tweedie's denoising at eps. solver="auto" takes the
    entry's solver; "unipc" or "ipndm" force that solver with its default options on the same
    grid. grid=None takes the shipped table, a table file (`is_table`) that one; any other value
    is a grid as for every sampler (a name of GRIDS, a .json schedule or times), and then the
    final evaluation is always the denoising. `generator` is unused (deterministic).
    """
    RULES["solver"].check("solver", solver)
    table = TABLE_FILE
    if is_table(grid):
        table, grid = grid, None
    e = entry(sde, steps, table)
    n = steps
    if denoise and grid is None and "final_step" in e:
        e, n = e["final_step"], steps + 1
    name, options = (e["solver"], e["options"]) if solver == "auto" else (solver, {})
    if grid is None:
        positions = e["positions"]
        grid = "quadratic" if positions is None else schedule_times(sde, positions, eps)
    grid = get_grid(grid, sde, n, eps)
    x = SOLVERS[name](sde, score_fn, x, steps=n, eps=eps, grid=grid, progress=progress, **options)
    return tweedie_denoise(sde, score_fn, x, eps) if denoise and n == steps else x
