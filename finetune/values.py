"""Checked values for the finetune configs: whole numbers and numbers in a range, comma lists, choices.

A ``check_*`` function takes a value from Python or from a parsed flag (text is parsed too) and
returns it normalised, or raises ``ConfigError`` with a message that names the CLI flag
("--lr must be > 0, got 0"): the name a user knows, whichever way they came in. The ``parse_*``
functions turn flag text into values; the CLI hands them to argparse as ``type=``, which shows
their message after the flag.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

from vfm.models.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A value or combination of values a finetune config refuses: one line; the CLI exits 2."""


def parse_number(text: str, kind: type = float) -> Any:
    """``kind(text)`` (int or float); a ValueError that says what was expected."""
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None


def parse_list(text: str, kind: type = float, unique: bool = True) -> tuple:
    """``"0.01,0.1"`` -> ``(0.01, 0.1)``; no empty items and, if ``unique``, no repeats."""
    parts = text.split(",")
    if not text.strip() or any(not part.strip() for part in parts):
        raise ValueError(f"{text!r}: give a comma-separated list without empty items")
    values = tuple(parse_number(part, kind) for part in parts)
    if unique and len(set(values)) != len(values):
        raise ValueError(f"{text!r} repeats a value")
    return values


def parse_names(text: str) -> tuple[str, ...]:
    """``"cat, dog"`` -> ``("cat", "dog")``; whether the names make sense is the config's to say."""
    return tuple(part.strip() for part in text.split(","))


def choice_problem(value: Any, choices: Iterable[str]) -> str:
    """What is wrong with a value outside ``choices``, worded for after the flag."""
    return f"{value!r}: use one of {', '.join(choices)}"


def check_choice(flag: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``, matched without regard to case or surrounding spaces."""
    word = value.strip().lower() if isinstance(value, str) else value
    if word not in choices:
        raise ConfigError(f"{flag} {choice_problem(word, choices)}")
    return word


def check_number(flag: str, value: Any, kind: type = float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> Any:
    """``value`` as ``kind`` (int or float), finite and within the bounds (open or closed)."""
    if isinstance(value, str):
        try:
            value = parse_number(value, kind)
        except ValueError as exc:
            raise ConfigError(f"{flag} {exc}") from None
    wanted = numbers.Integral if kind is int else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise ConfigError(f"{flag} {value!r} is not {'a whole number' if kind is int else 'a number'}")
    value = kind(value)
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be finite, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{flag} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{flag} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def check_optional(flag: str, value: Any, kind: type = float, **bounds: Any) -> Any:
    """``None`` (not given), or a number as ``check_number`` checks it."""
    return None if value is None else check_number(flag, value, kind, **bounds)


def check_numbers(flag: str, value: Any, kind: type = float, unique: bool = True, **bounds: Any) -> tuple:
    """A non-empty tuple of numbers, each checked; from a sequence, one number or ``"a,b,c"``."""
    if isinstance(value, str):
        try:
            value = parse_list(value, kind, unique)
        except ValueError as exc:
            raise ConfigError(f"{flag} {exc}") from None
    elif isinstance(value, numbers.Number):
        value = (value,)
    values = tuple(check_number(flag, v, kind, **bounds) for v in value)
    if not values:
        raise ConfigError(f"{flag}: give at least one value")
    if unique and len(set(values)) != len(values):
        raise ConfigError(f"{flag} {shown(values)!r} repeats a value")
    return values


def shown(value: Any) -> str:
    """A value as a user would type it as a flag: ``(0.8, 0.1, 0.1)`` -> ``0.8,0.1,0.1``."""
    if isinstance(value, (tuple, list)):
        return ",".join(shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
