"""Atomic file writes, and the check that a file is a whole `torch.save` archive, shared by
every layer that writes a user's results or reads checkpoints.

A result file (checkpoint, samples, metrics, fitted schedule) is written to a temporary file in
the same folder, flushed and fsynced, then renamed over its target: rename is atomic on POSIX, so a
crash mid-write never leaves a half-written file under the result's name, and the old file
survives until the new one is complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file_object) on a temp file beside `path`, fsync, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


ZIP_MAGIC = b"PK\x03\x04"


def torch_archive_problem(path: Path) -> str | None:
    """Why `path` is not a complete torch.save zip archive, or None if it is one."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head != ZIP_MAGIC:
        return (
            f"it is not a PyTorch checkpoint archive ({size} bytes starting {head!r}; "
            "garbage, a plain pickle or another format)"
        )
    if not zipfile.is_zipfile(path):
        return f"it is truncated or corrupt (a {size}-byte zip archive without its directory)"
    return None


def load_weights_only(path: Path, map_location="cpu"):
    """`torch.load(path, weights_only=True)` after checking that the file is a whole archive:
    tensors, numbers, strings and containers only, so a crafted file cannot run code. ValueError
    with the reason (unreadable, truncated, not an archive, holds other Python objects)."""
    path = Path(path)
    try:
        problem = torch_archive_problem(path)
    except OSError as e:
        raise ValueError(f"it cannot be read ({e.strerror or e})") from None
    if problem is not None:
        raise ValueError(problem)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if any("GLOBAL" in ln for ln in lines):
            reason = (
                "it holds Python objects other than tensors "
                "(refused: unpickling them could run code)"
            )
        elif lines and lines[0].startswith("Weights only load failed"):
            detail = next((ln for ln in lines if "Unsupported" in ln), lines[-1])
            reason = f"it holds pickle data the safe loader refuses ({detail})"
        else:
            reason = f"it is corrupt ({type(e).__name__}{': ' + lines[0] if lines else ''})"
        raise ValueError(reason) from None


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
