"""Checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is one `torch.save` zip archive holding only tensors, numbers, strings, lists and dicts
(model, EMA, optimiser, step, RNG states, the resolved config as JSON and a format version).
`load` first checks that the file is a complete zip archive (a truncated or foreign file is refused
before any unpickling), then uses `torch.load(weights_only=True)`, whose restricted unpickler
refuses any other object, so a crafted file cannot run code; finally it checks the layout and that
every weight is finite. `save` refuses non-finite weights, writes a temporary file in the same
folder, flushes and fsyncs it, then renames it over the target (atomic on POSIX), so a crash
mid-write never leaves a half-written checkpoint under a checkpoint's name.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from sde_lib.io import atomic_write, load_weights_only

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
_REQUIRED = ("model", "ema", "step", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and the reason named."""


def non_finite(state: dict) -> list[str]:
    """Names ("model.<param>", "ema.<param>") of floating tensors holding NaN or inf."""
    return [
        f"{part}.{name}"
        for part in ("model", "ema")
        for name, v in (state.get(part) or {}).items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def save(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically; refuse (CheckpointError) non-finite weights."""
    bad = non_finite(state)
    if bad:
        raise CheckpointError(
            f"refusing to write checkpoint {path}: non-finite values in {', '.join(bad[:3])}"
            + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        )
    state = {**state, "format_version": FORMAT_VERSION}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def _layout_problem(state) -> str | None:
    """Why a loaded object is not a usable scoresde checkpoint, or None."""
    if not isinstance(state, dict) or "format_version" not in state:
        return "it is not a scoresde checkpoint (no format_version)"
    if state["format_version"] != FORMAT_VERSION:
        return (
            f"it has format version {state['format_version']!r}; "
            f"this scoresde reads version {FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        return f"it is incomplete: missing {', '.join(map(repr, missing))}"
    for part in ("model", "ema"):
        w = state[part]
        if not isinstance(w, dict) or not all(torch.is_tensor(v) for v in w.values()):
            return f"its {part!r} entry is not a dict of tensors"
    if not isinstance(state["step"], int) or state["step"] < 0:
        return f"its step {state['step']!r} is not a non-negative integer"
    try:
        config = json.loads(state["config"])
    except (TypeError, ValueError):
        return "its config is not valid JSON"
    if not isinstance(config, dict) or not all(k in config for k in ("sde", "data", "model")):
        return "its config lacks the sde, data and model sections"
    bad = non_finite(state)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"it holds non-finite weights ({', '.join(bad[:3])}{more})"
    return None


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint; raise CheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass ckpt=PATH to an existing file")
    try:
        state = load_weights_only(path, map_location)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {e}") from None
    problem = _layout_problem(state)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    return state


def config_of(state: dict) -> dict:
    return json.loads(state["config"])


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:08d}.pt"


def step_of(path: Path) -> int | None:
    """The training step in a checkpoint's file name (ckpt_00001000.pt -> 1000), else None."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for p in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


def latest_valid(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in `folder` that loads; unusable ones are reported and skipped."""
    for p in reversed(list_checkpoints(folder)):
        try:
            return p, load(p)
        except CheckpointError as e:
            log.warning(f"{e}; falling back to an earlier checkpoint")
    return None
