"""Rules for option values, stated once by the module that owns the option.

A sampler, an SDE or a task declares each option's allowed values as a rule next to the code
that uses it; the same rule checks a call from Python and a run's config before any work
starts, so an allowed value is written in one place. A broken rule raises `OptionError`, which is
both a `ValueError` (for library callers) and a `UserError` (run.py prints it as one line).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UserError


class OptionError(UserError, ValueError):
    """An option value outside its rule; the message names the key, the value and the rule."""


def _fail(key: str, value: Any, allowed: str) -> OptionError:
    return OptionError(f"{key}={value!r} is not allowed; allowed: {allowed}")


@dataclass(frozen=True)
class Choice:
    """One of the listed values (compared with ==; True/False for a flag)."""

    values: tuple

    def __init__(self, *values: Any) -> None:
        object.__setattr__(self, "values", tuple(values))

    def check(self, key: str, value: Any) -> Any:
        if not any(value == v and type(value) is type(v) for v in self.values):
            raise _fail(key, value, ", ".join(map(str, self.values)))
        return value


FLAG = Choice(True, False)


@dataclass(frozen=True)
class Number:
    """A finite number (an integer with integer=True) within optional bounds, or None if none_ok."""

    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    lo_open: bool = False
    hi_open: bool = False
    none_ok: bool = False

    def describe(self) -> str:
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {self.lo}")
        if self.hi is not None:
            bounds.append(f"{'<' if self.hi_open else '<='} {self.hi}")
        text = f"{'an integer' if self.integer else 'a finite number'} {' and '.join(bounds)}"
        return text.rstrip() + (" or null" if self.none_ok else "")

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.none_ok:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (not self.integer or float(value).is_integer())
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise _fail(key, value, self.describe())
        return int(value) if self.integer else float(value)


def check_options(
    rules: Mapping[str, Choice | Number], values: Mapping[str, Any], prefix: str = ""
) -> None:
    """Check each value that has a rule; keys without a rule are the caller's to check."""
    for key, value in values.items():
        if key in rules:
            rules[key].check(prefix + key, value)
