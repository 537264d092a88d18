"""The command line's listener of library progress (``core/progress.py``): one rich bar with ETA per
step on stderr, removed when the step ends. Off with ``-q`` and with ``--json``; rich draws nothing
when stderr is not a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..core.progress import listening
from .console import err
from .verbosity import progress_enabled


@contextmanager
def progress_bars(*, disable: bool = False) -> Iterator[None]:
    """Draw the library's progress while the block runs (nothing with ``disable`` or ``-q``)."""
    if disable or not progress_enabled():
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True)
    tasks: dict[str, object] = {}

    def listener(name: str, done: int, total: int) -> None:
        if total <= 0:
            return  # nothing to show
        task = tasks.get(name)
        if task is None:
            task = tasks[name] = bars.add_task(name, total=total)
        bars.update(task, completed=done, total=total)
        if done >= total:
            bars.remove_task(task)
            del tasks[name]

    with bars, listening(listener):
        yield


@contextmanager
def hub_progress_bars(*, disable: bool = False) -> Iterator[None]:
    """huggingface_hub's own upload bars (tqdm, with ETA) while the block runs: off by default
    elsewhere, as third-party noise (cli/verbosity.py), but an upload's progress is the command's own."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    show = not disable and progress_enabled()
    (enable_progress_bars if show else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()
