"""The user-error type shared by every layer.

A `UserError` is bad input a user can fix (a config value, a path, a checkpoint that does not fit
the run). Any layer may raise it with one line that names the problem and the fix; run.py prints
that line on stderr and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: run.py prints it as one line and exits with code 2."""
