"""Checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is one `torch.save` file holding only tensors, numbers, strings, lists and dicts
(model, EMA, optimiser, step, RNG states, the resolved config as JSON and a format version).
`load` uses `torch.load(weights_only=True)`, whose restricted unpickler refuses any other object,
so a crafted file cannot run code. `save` writes a temporary file in the same folder, flushes and
fsyncs it, then renames it over the target (atomic on POSIX), so a crash mid-write never leaves a
half-written checkpoint under a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and the reason named."""


def atomic_write(path: Path, write) -> None:
    """Call write(file_object) on a temp file beside `path`, fsync, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save(path: Path, state: dict) -> None:
    state = {**state, "format_version": FORMAT_VERSION}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint; raise CheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass ckpt=PATH to an existing file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = (
                "it holds Python objects other than tensors "
                "(refused: unpickling them could run code)"
            )
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {reason}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not a scoresde checkpoint of format {FORMAT_VERSION}"
        )
    for key in ("model", "ema", "step", "config"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {key!r}")
    return state


def config_of(state: dict) -> dict:
    return json.loads(state["config"])


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:08d}.pt"


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


def latest_valid(folder: Path, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint in `folder` that loads; corrupt ones are reported and skipped."""
    for p in reversed(list_checkpoints(folder)):
        try:
            return p, load(p)
        except CheckpointError as e:
            log(f"warning: {e}; falling back to an earlier checkpoint")
    return None
