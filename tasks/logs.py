"""Console logging for run.py: messages on stdout, warnings and errors on stderr.

Hydra configures logging from conf/hydra/job_logging/scoresde.yaml with these two pieces; every
module logs through `logging.getLogger(__name__)`. A warning reads `warning: ...` on stderr, so a
user (or a script) tells it from a result line at a glance; the run's full log, with times and
module names, is also written to the run folder.
"""

from __future__ import annotations

import logging


class BelowWarning(logging.Filter):
    """Pass records below WARNING: the stdout handler's share (stderr takes the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class Console(logging.Formatter):
    """The message alone; `warning: ` / `error: ` before a record of that level or above."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text
