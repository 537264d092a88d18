"""The staging of an output folder (the rules are :mod:`.output`'s): one run at a time per ``--out``
(a ``flock``-held lock beside it), a hidden ``.{name}.partial-*`` folder marked incomplete until its
final rename, SIGTERM/SIGHUP cleaned up like Ctrl-C, and OS errors named by path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, QdlmError
from .output import (
    INCOMPLETE_MARKER,
    LOCK_SUFFIX,
    STAGING_INFIX,
    TOOL,
    OutputBusyError,
    Terminated,
    check_output,
    is_output_failure,
    os_write_error,
    oserror_in_chain,
)

# ---------------------------------------------------------------------------------------------
# Owner records: lock and marker
# ---------------------------------------------------------------------------------------------

def _owner_record() -> dict[str, Any]:
    return {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _write_marker(folder: Path, out: Path) -> None:
    """The incomplete marker, written whole or not at all (a temporary file renamed into place): a run
    killed while writing it must not leave an empty marker, whose owner the next run cannot know."""
    partial = folder / (INCOMPLETE_MARKER + ".tmp")
    partial.write_text(json.dumps({**_owner_record(), "out": str(out)}))
    os.replace(partial, folder / INCOMPLETE_MARKER)


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume alive, never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def _owner_dead(owner: dict[str, Any] | None) -> bool:
    """Dead for sure: recorded on this host and no process has its pid."""
    if not owner or owner.get("host") != socket.gethostname():
        return False
    return not _pid_alive(owner.get("pid"))


class OutputLock:
    """``.{name}.lock`` beside ``out``, held with ``flock`` for the whole run.

    The kernel releases ``flock`` when its process dies (SIGKILL included), so a lock file left by a
    killed run is taken over at once. Where ``flock`` is unsupported, the file's own existence is the
    lock (created with ``O_EXCL``), and one whose pid is dead on this host is stale.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}{LOCK_SUFFIX}"
        self._fd: int | None = None

    def _busy(self) -> OutputBusyError:
        owner = _read_owner(self.path) or {}
        who = f"pid {owner.get('pid')}" + (f" on {owner['host']}" if owner.get("host") not in (None, socket.gethostname()) else "")
        since = ""
        if isinstance(owner.get("started"), (int, float)):
            since = time.strftime(" since %H:%M:%S", time.localtime(owner["started"]))
        return OutputBusyError(
            f"another qdlm-export run ({who if owner else 'unknown pid'}{since}) is writing {self.out}",
            hint=f"wait for it to finish, or choose another --out (its lock is {self.path})",
        )

    def acquire(self) -> None:
        import fcntl

        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except OSError as exc:  # no flock on this file system
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_exclusive()
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed it between our open and flock: try again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_owner_record()).encode())
            self._fd = fd
            return
        raise self._busy()

    def _acquire_exclusive(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if _owner_dead(_read_owner(self.path)):
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy() from None
            os.write(fd, json.dumps(_owner_record()).encode())
            os.close(fd)
            self._fd = -1
            return
        raise self._busy()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can take it meanwhile
        finally:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = None


def _remove_stale_lock(path: Path) -> bool:
    """Remove a lock file of ours whose owner is dead on this host, holding its ``flock`` meanwhile
    (a live owner holds it, so it cannot be taken from under a running process)."""
    import fcntl

    if path.is_symlink() or not _owner_dead(_read_owner(path)):
        return False
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino or not _owner_dead(_read_owner(path)):
            return False
        path.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove what runs killed in ``parent`` left: ``.*.partial-*`` folders holding our marker and
    ``.*.lock`` files of ours, whose owner was on this host and is no longer running. A folder
    without the marker, or whose owner is alive or elsewhere, is never touched."""
    removed = []
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".")]
    except OSError:
        return removed
    for p in entries:
        if p.name.endswith(LOCK_SUFFIX) and _remove_stale_lock(p):
            removed.append(p)
    candidates = [p for p in entries if STAGING_INFIX in p.name]
    for p in candidates:
        if p.is_symlink() or not p.is_dir():
            continue
        marker = p / INCOMPLETE_MARKER
        if marker.is_symlink() or not marker.is_file() or not _owner_dead(_read_owner(marker)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------

_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


@contextmanager
def _terminate_as_interrupt() -> Iterator[dict[str, bool]]:
    """SIGTERM/SIGHUP raise :class:`Terminated` while active (main thread only); ``state['raise']``
    set False keeps cleanup from being interrupted by a second signal."""
    state = {"raise": True}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["raise"]:
            state["raise"] = False
            raise Terminated(signum)

    previous = {}
    for s in _SIGNALS:
        try:
            previous[s] = signal.signal(s, handler)
        except (ValueError, OSError):
            pass
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# The staged write
# ---------------------------------------------------------------------------------------------

def _apply_umask(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; a checkpoint gets ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _mkdirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first."""
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        d.mkdir()
        created.append(d)
    return created


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that fails with FileExistsError when ``dst`` exists (plain rename would replace an
    empty folder that appeared meanwhile)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # unsupported by this file system: fall through
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_output(out: str | Path, overwrite: bool, *, source: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty, marked staging folder beside ``out``; move it to ``out`` when the block ends
    without an exception. ``out`` is checked by :func:`check_output` (``source`` as there) and locked
    for the duration; on any failure the staging folder, the lock and any parent folder created
    here are removed, and an existing ``out`` is left as it was."""
    out = check_output(out, overwrite, source=source)
    created: list[Path] = []
    lock = OutputLock(out)
    tmp: Path | None = None
    with _terminate_as_interrupt() as signals:
        try:
            try:
                created = _mkdirs(out.parent)
                lock.acquire()
                check_output(out, overwrite, source=source)  # again, now that we hold the lock
                remove_stale_staging(out.parent)
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_INFIX}", dir=out.parent))
                _write_marker(tmp, out)
            except OSError as exc:
                raise os_write_error(exc, out.parent, "creating the staging folder in") from None
            try:
                yield tmp
                _apply_umask(tmp)
                signals["raise"] = False  # the final step runs to its end: a signal now is ignored
                _finish(tmp, out, overwrite, source)
            except QdlmError:
                raise
            except Exception as exc:
                os_exc = oserror_in_chain(exc)
                if os_exc is None or not is_output_failure(os_exc, tmp, out):
                    raise
                raise os_write_error(os_exc, tmp, out=out) from exc
        finally:
            signals["raise"] = False
            if tmp is not None and os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            lock.release()
            if not os.path.lexists(out):
                for d in reversed(created):
                    try:
                        d.rmdir()
                    except OSError:
                        break


def _finish(tmp: Path, out: Path, overwrite: bool, source: str | Path | None) -> None:
    if os.path.lexists(out):
        if not overwrite:
            raise OutputExistsError(
                f"output folder {out} appeared while this run was writing it",
                hint="choose another --out, or pass --overwrite to replace it",
            )
        check_output(out, overwrite, source=source)
        # Replace: mark the old folder incomplete and move it aside first, so that a failure here still
        # leaves one of them, and a kill leaves a staging folder the next run removes.
        _write_marker(out, out)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_INFIX}old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        (tmp / INCOMPLETE_MARKER).unlink()
        try:
            _rename_noreplace(tmp, out)
        except BaseException:
            old.rename(out)
            (out / INCOMPLETE_MARKER).unlink(missing_ok=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        (tmp / INCOMPLETE_MARKER).unlink()
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            raise OutputExistsError(
                f"output folder {out} appeared while this run was writing it",
                hint="choose another --out, or pass --overwrite to replace it",
            ) from None
