"""Atomic output folders: everything is written into a hidden temporary sibling and moved into
place only when complete, so an interrupted run never leaves something that looks like a checkpoint
and never destroys an existing one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError


def check_output(out: Path, overwrite: bool) -> None:
    """Fail early, before any work, when ``out`` exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"output folder {out} already exists",
            hint="choose another --out, or pass --overwrite to replace it",
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a folder", hint="choose another --out")


def _apply_umask(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; a checkpoint gets ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    out = Path(out).expanduser().resolve()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            # Replace: move the old folder aside first so a failure here still leaves one of them.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
