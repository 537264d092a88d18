"""The Hub switched off for a run: environment variables and the module constants huggingface_hub
and datasets read them into at import, set and then restored."""

from __future__ import annotations

import contextlib
import os
from typing import Any

_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _offline_constants() -> list[tuple[Any, str]]:
    """The module constants huggingface_hub and datasets read the offline switch from at import."""
    found = []
    for mod_name in ("huggingface_hub.constants", "datasets.config"):
        try:
            mod = __import__(mod_name, fromlist=["_"])
        except ImportError:
            continue
        if hasattr(mod, "HF_HUB_OFFLINE"):
            found.append((mod, "HF_HUB_OFFLINE"))
    return found


def set_offline() -> None:
    """No Hub access from here on: datasets and hub clients use only local files and caches."""
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    for mod, name in _offline_constants():
        setattr(mod, name, True)


@contextlib.contextmanager
def offline_mode(enabled: bool = True):
    """:func:`set_offline` for the duration of a ``with`` block; the previous state comes back after."""
    if not enabled:
        yield
        return
    saved_env = {var: os.environ.get(var) for var in _OFFLINE_VARS}
    saved_consts = [(mod, name, getattr(mod, name)) for mod, name in _offline_constants()]
    set_offline()
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for mod, name, value in saved_consts:
            setattr(mod, name, value)
