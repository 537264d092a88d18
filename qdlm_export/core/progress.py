"""Progress of the long steps (tokenizing, quantizing blocks, verifying, converting), reported to
whoever listens. The library draws nothing itself: the command line installs a listener that draws
rich bars with ETA on stderr (``cli/progress_bars.py``); the Python API stays silent unless its
caller installs one with :func:`listening`.

A step is reported as ``(name, done, total)`` calls: first with ``done == 0``, then as work
completes, and a last one with ``done == total`` when the step ends, even when it stops early (an
error), so that a listener can close its bar.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Listener = Callable[[str, int, int], None]  # (step name, done, total)

_listeners: list[Listener] = []


class Step:
    """One step in progress: ``advance()`` as its units of work complete."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done = name, max(int(total), 0), 0

    def advance(self, units: int = 1) -> None:
        self.done = min(self.total, self.done + units)
        _notify(self.name, self.done, self.total)


@contextmanager
def step(name: str, total: int) -> Iterator[Step]:
    """Report a step of ``total`` units named ``name`` ("tokenizing calibration text")."""
    current = Step(name, total)
    _notify(name, 0, current.total)
    try:
        yield current
    finally:
        _notify(name, current.total, current.total)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every step reported inside this block to ``listener`` too."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def _notify(name: str, done: int, total: int) -> None:
    for listener in list(_listeners):
        listener(name, done, total)
