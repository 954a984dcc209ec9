"""The three modes of run.py (train, sample, nll) over plain-dict configs; no Hydra here."""

from __future__ import annotations

import os
from pathlib import Path

from .common import UserError
from .validate import validate


def dispatch(cfg: dict, out_dir: Path, log=print) -> dict:
    """Validate `cfg` and run its mode, writing outputs under `out_dir`."""
    validate(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
        log(f"{cfg['mode']} run: outputs in {out_dir}")
    if cfg["mode"] == "train":
        from .train import run_train

        return run_train(cfg, out_dir, log)
    if cfg["mode"] == "eval" or (cfg["mode"] == "sample" and (cfg.get("eval") or {}).get("only")):
        from .evaluate import run_eval

        return run_eval(cfg, out_dir, log)
    if cfg["mode"] == "sample":
        try:
            from .sample import run_sample
        except ImportError:
            raise UserError("mode=sample is not built yet") from None
        return run_sample(cfg, out_dir, log)
    try:
        from .nll import run_nll
    except ImportError:
        raise UserError("mode=nll is not built yet") from None
    return run_nll(cfg, out_dir, log)


__all__ = ["dispatch", "UserError", "validate"]
