"""The four modes of run.py (train, sample, nll, eval) over plain-dict configs; no Hydra here."""

from __future__ import annotations

import logging
from pathlib import Path

from sde_lib.errors import UserError

from .control import run_control
from .evaluate import run_eval
from .inverse import run_inverse
from .nll import run_nll
from .sample import run_sample
from .train import run_train
from .validate import validate

log = logging.getLogger(__name__)


def dispatch(cfg: dict, out_dir: Path) -> dict:
    """Validate `cfg` and run its mode, writing outputs under `out_dir`."""
    validate(cfg)
    log.info(f"{cfg['mode']} run: outputs in {out_dir}")  # run.py quiets ranks other than 0
    mode = cfg["mode"]
    if mode == "train":
        return run_train(cfg, out_dir)
    if mode == "eval" or (mode == "sample" and (cfg.get("eval") or {}).get("only")):
        return run_eval(cfg, out_dir)
    task = cfg["sampler"].get("task", "sample")
    if mode == "sample" and task != "sample" and cfg["sampler"].get("grid") == "auto":
        # a schedule is fitted to the unconditional flow only: the others keep their own grid
        log.info(f"sampler.grid=auto: the sampler's own default grid (sampler.task={task})")
        cfg = {**cfg, "sampler": {**cfg["sampler"], "grid": None}}
    if mode == "sample" and task == "inverse":
        return run_control(cfg, out_dir, run_inverse)  # y = A x + noise: posterior samples
    if mode == "sample" and task != "sample":
        return run_control(cfg, out_dir)  # inpaint, colorize: conditioned on data
    if mode == "sample":
        return run_sample(cfg, out_dir)
    return run_nll(cfg, out_dir)


__all__ = ["dispatch", "UserError", "validate"]
