"""Checks of the Python API's arguments at entry, shared by ``inspect_checkpoint``,
``evaluate_checkpoint`` and the pipeline's device resolution.

The command line checks the same values in its option callbacks (``cli.py``); these are for callers
of the library, so that a wrong type or value fails at once naming the argument and what it accepts,
instead of deep inside torch (``torch.device('tpu')``) or, worse, working by accident (``write='no'``
is truthy).
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import ArgumentTypeError, ConfigError

DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(?::(\d+))?)$")


def check_bool(function: str, name: str, value: Any, *, optional: bool = False) -> None:
    if isinstance(value, bool) or (optional and value is None):
        return
    accepted = "True or False" + (" (or None)" if optional else "")
    raise ArgumentTypeError(
        f"{function}() argument {name} must be {accepted}, got {type(value).__name__} {value!r}",
        hint=f"pass {name} as {accepted}",
    )


def check_path(function: str, name: str, value: Any) -> None:
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value):
        return
    raise ArgumentTypeError(
        f"{function}() argument {name} must be a folder path (a non-empty str or os.PathLike), "
        f"got {type(value).__name__} {value!r}",
        hint=f"pass {name} as a folder path",
    )


def check_int(function: str, name: str, value: Any, *, low: int, option: str | None = None) -> None:
    what = option or f"{function}() argument {name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"{what} must be an int, got {type(value).__name__} {value!r}", hint=f"pass {name} as an integer >= {low}"
        )
    if value < low:
        raise ConfigError(f"{what} {value} is out of range", hint=f"{option or name} accepts an integer >= {low}")


def check_device(value: Any, *, option: str = "--device", allow_auto: bool = True) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (and ``auto`` where it means something): the device name,
    lower-cased; anything else is a ``ConfigError`` naming the value and what is accepted."""
    accepted = "cpu, cuda, cuda:N" + (" or auto" if allow_auto else "")
    if not isinstance(value, str):
        raise ArgumentTypeError(
            f"{option} must be a str, got {type(value).__name__} {value!r}", hint=f"pass one of {accepted}"
        )
    device = value.strip().lower()
    if not DEVICE_PATTERN.match(device) or (device == "auto" and not allow_auto):
        raise ConfigError(f"{option} {value!r} is not a device", hint=f"accepted: {accepted}")
    return device
