"""Command lines that fit sampling schedules; they sit above the samplers because they read
trained checkpoints.

    python -m tasks.schedules fit --sde vp --data gmm8 --solver unipc --nfe 10 --out s.json
    python -m tasks.schedules fit --checkpoint CKPT --solver unipc --nfe 10 --out s.json
    python -m tasks.schedules refit --out table.json --images vp=CKPT --images subvp=CKPT
                                    [--base TABLE] [--steps 4-24] [--kinds vp]

`fit` writes one schedule (samplers.optimise_grid.fit_schedule) for a checkpoint's model or for the
exact score of a mixture law; use it with `sampler.grid=s.json`. `refit` refits the table of
`sampler=fast`'s defaults by each entry's recipe (tasks.fast_refit) on the exact mixture scores
and the given trained models, and writes it to --out: `sampler=fast sampler.grid=table.json`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from data.mixtures import gmm8, mixture5d
from models.exact import MixtureScore
from samplers.api import fit_schedule
from samplers.fast import TABLE_FILE, load_table
from samplers.grids import save_schedule
from samplers.optimise_grid import FITTABLE
from sde_lib.errors import UserError
from training import checkpoint as ckpt

from .common import load_score_model
from .fast_refit import KIND_SDES, refit

log = logging.getLogger(__name__)
EXACT_LAWS = {"gmm8": gmm8, "mix5d": mixture5d}


def exact_model(sde_name: str, data: str):
    """(sde, exact mixture score, data shape, record fields) of a closed-form law."""
    sde = KIND_SDES[sde_name]()
    law = EXACT_LAWS[data]()
    return sde, MixtureScore(sde, law), (law.dim,), {"data": data}


def checkpoint_model(path: Path):
    """(sde, EMA score model in eval mode, data shape, record fields) of a score checkpoint."""
    saved = ckpt.config_of(ckpt.load(path))
    sde, dataset, model, found = load_score_model({**saved, "ckpt": str(path)})
    fields = {"checkpoint": str(found), "data": saved["data"]["name"]}
    return sde, model, tuple(dataset.shape), fields


def _steps(text: str) -> list[int]:
    """'4-12' or '9,19' as a list of step counts."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(v) for v in text.split(",")]


def fit(a: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    if a.checkpoint is not None and (a.sde or a.data):
        parser.error("--sde / --data come from the checkpoint; drop them or drop --checkpoint")
    steps = a.nfe - (0 if a.no_denoise else 1)
    if steps < 1:
        parser.error(f"--nfe {a.nfe} leaves no solver step")
    if a.checkpoint is not None:
        sde, score_fn, shape, source = checkpoint_model(a.checkpoint)
    else:
        sde, score_fn, shape, source = exact_model(a.sde or "vp", a.data or "gmm8")
    times, info = fit_schedule(
        sde,
        score_fn,
        shape,
        a.solver,
        steps,
        eps=a.eps,
        denoise=not a.no_denoise,
        batch=a.batch,
        seed=a.seed,
        dtype=torch.float64 if a.checkpoint is None else None,
    )
    path = save_schedule(
        a.out,
        times,
        sde=repr(sde),
        **source,
        solver=a.solver,
        nfe=a.nfe,
        eps=a.eps,
        denoise=not a.no_denoise,
        fit=info,
    )
    starts = ", ".join(f"{k} {v:.3g}" for k, v in info["mse_start"].items())
    log.info(
        f"wrote {path}: steps={steps}, start {info['start']}, mse {info['mse']:.3g} "
        f"(fixed grids: {starts})"
    )
    return path


def refit_table(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # the shipped fit was made so; one thread is also reproducible
    images: dict[str, list] = {}
    for v in a.images:  # repeatable, also per kind: each checkpoint joins its kind's fit
        kind, _, path = v.partition("=")
        if not path:
            raise ValueError(f"--images {v!r}: write KIND=CKPT, e.g. --images vp=ckpt.pt")
        sde, model, shape, _ = checkpoint_model(Path(path))
        images.setdefault(kind, []).append((sde, model, shape))
    keys = None
    if a.steps or a.kinds:
        entries = load_table(a.base)
        kinds = a.kinds.split(",") if a.kinds else None
        steps = _steps(a.steps) if a.steps else None
        keys = [
            k
            for k in entries
            if (kinds is None or k.split("/")[0] in kinds)
            and (steps is None or int(k.split("/")[1]) in steps)
        ]
    refit(a.out, images, base=a.base, keys=keys)
    log.info(f"wrote {a.out}: use it with sampler=fast sampler.grid={a.out}")


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(prog="python -m tasks.schedules", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit one schedule and write it as JSON")
    f.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a trained score model's checkpoint: its SDE, data shape and EMA "
        "weights (then --sde / --data are taken from it)",
    )
    f.add_argument(
        "--sde",
        choices=tuple(KIND_SDES),
        default=None,
        help="exact mixture score: the SDE (default vp)",
    )
    f.add_argument(
        "--data",
        choices=tuple(EXACT_LAWS),
        default=None,
        help="exact mixture score: the law (default gmm8)",
    )
    f.add_argument("--solver", default="unipc", choices=FITTABLE, help="a deterministic solver")
    f.add_argument("--nfe", type=int, default=10, help="budget, final denoising included")
    f.add_argument("--no-denoise", action="store_true")
    f.add_argument("--eps", type=float, default=1e-3)
    f.add_argument(
        "--batch",
        type=int,
        default=None,
        help="calibration batch size (default 1000 points, 256 images)",
    )
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, required=True, help="JSON schedule file to write")
    r = sub.add_parser("refit", help="refit the table of sampler=fast's defaults into a file")
    r.add_argument("--out", type=Path, required=True, help="the table file to write")
    r.add_argument(
        "--base", type=Path, default=TABLE_FILE, help="the table to refit (default: shipped)"
    )
    r.add_argument(
        "--images",
        action="append",
        default=[],
        metavar="KIND=CKPT",
        help="a trained model of that SDE kind (vp, subvp, ve) to fit on as well",
    )
    r.add_argument("--steps", default=None, help="only these step counts, e.g. 4-12 or 9,19")
    r.add_argument("--kinds", default=None, help="only these kinds, e.g. vp,ve")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        if a.command == "fit":
            return fit(a, parser)
        refit_table(a)
    except (ValueError, OSError, UserError, ckpt.CheckpointError) as e:
        parser.exit(2, f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
    return None


if __name__ == "__main__":
    main()
