"""Compose run.py's config in-process (Hydra compose API) and run a mode through tasks.dispatch;
a free TCP port for torchrun."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tasks.logs import Console

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_cfg(outputs_root: Path, *overrides: str) -> dict:
    base = [f"outputs_root={outputs_root}", "logger.mode=disabled", "progress=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*base, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def run_mode(outputs_root: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    """Run a mode with its outputs in outputs_root/<mode>/<name> (as run.py would)."""
    from tasks import dispatch

    cfg = compose_cfg(outputs_root, *overrides)
    out = Path(outputs_root) / cfg["mode"] / name
    out.mkdir(parents=True, exist_ok=True)
    return dispatch(cfg, out), out


@contextmanager
def log_lines() -> Iterator[list[str]]:
    """The toolkit's log lines while the block runs, as the console shows them ("warning: ...")."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler, root = Keep(), logging.getLogger()
    handler.setFormatter(Console("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it: bind to port 0), for torchrun's
    --master_port, so that tests running side by side (pytest -n 2) never share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
