"""Safe output folders: checked before any work, written into a marked hidden sibling, moved into
place only when complete, and never at the cost of anything that is not a previous output.

The rules, in the order they are applied (docs/ARCHITECTURE.md, "Safety"):

* ``--out`` is resolved (a symlink counts as its target). It may never be ``/``, the home folder,
  the current folder or one of its ancestors, the source model folder or a folder containing it,
  nor anything but a folder. These are refused whatever the flags.
* An existing ``--out`` is replaced only with ``--overwrite``, and only when it is empty or a
  previous output of this tool (:func:`is_tool_output`); any other content is refused.
* The parent must be a writable folder and the names (output, staging folder, lock) valid, checked
  before any heavy work.
* One run at a time per ``--out``: ``.{name}.lock`` beside it, held with ``flock`` for the whole
  run, so a lock left by a killed run is free again at once. A second run fails clearly.
* The staging folder ``.{name}.partial-*`` holds :data:`INCOMPLETE_MARKER` (with its owner's pid,
  host and start time) until just before the final rename; ``inspect`` and ``push`` refuse it
  (:func:`is_staging_folder`). Staging folders of dead owners on this host are removed by the next
  run into the same parent.
* SIGTERM and SIGHUP clean up like Ctrl-C (:class:`Terminated` is a ``KeyboardInterrupt``); OS
  errors while writing (disk full, read-only, permission) become :class:`OutputWriteError` naming
  the path, and nothing partial is left.
"""

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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import OutputExistsError, QdlmError
from .spec import LOCAL_SOURCE_FILE, REPORT_FILE

# A staging folder holds this file until just before its final rename: inspect/push refuse it.
INCOMPLETE_MARKER = ".qdlm-incomplete"
STAGING_INFIX = ".partial-"
LOCK_SUFFIX = ".lock"
TOOL = "qdlm-export"
_STAGING_RANDOM = 8  # tempfile.mkdtemp's random part
_HINT_OTHER_OUT = "choose another --out (a new folder, or a previous qdlm-export output with --overwrite)"


class OutputRefusedError(OutputExistsError):
    """``--out`` names a folder that must never be replaced (the source, the current folder, ...)."""


class OutputBusyError(QdlmError):
    """Another qdlm-export run is writing the same ``--out``."""


class OutputWriteError(QdlmError):
    """The output could not be written: disk full, read-only, permission denied, name too long."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a staged write: unwinds (and cleans up) like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def is_staging_folder(path: str | Path) -> bool:
    """True for an unfinished output: a folder holding the marker, or named like a staging folder."""
    p = Path(path)
    name = p.name or p.resolve().name
    if name.startswith(".") and STAGING_INFIX in name:
        return True
    return os.path.lexists(p / INCOMPLETE_MARKER)


def is_tool_output(folder: str | Path) -> bool:
    """Whether ``folder`` was written by this tool: a ``qdlm_report.json`` (every format writes one),
    or a ``config.json`` whose ``quantization_config`` is qdlm's or names qdlm-export as its tool."""
    folder = Path(folder)
    if (folder / REPORT_FILE).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qconfig, dict):
        return False
    provenance = qconfig.get("provenance")
    return qconfig.get("quant_method") == "qdlm" or (isinstance(provenance, dict) and provenance.get("tool") == TOOL)


# ---------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------

def _is_relative_to(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _refused(out: Path, why: str) -> OutputRefusedError:
    return OutputRefusedError(f"refusing to write to {out}: {why}", hint=_HINT_OTHER_OUT)


def _check_protected(out: Path, source: Path | None) -> None:
    """Folders never replaced, whatever the flags."""
    if out == Path(out.anchor) or not out.name:
        raise _refused(out, "it is the root of the file system")
    home = _resolve(Path.home())
    if out == home:
        raise _refused(out, "it is your home folder")
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and _is_relative_to(cwd, out):
        raise _refused(out, "it is the current folder" if cwd == out else f"it contains the current folder {cwd}")
    if source is not None:
        if source == out:
            raise _refused(out, "it is the source model folder (replacing it would delete the original weights)")
        if _is_relative_to(source, out):
            raise _refused(out, f"it contains the source model folder {source}")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _check_parent(out: Path) -> None:
    """The parent must be (or become) a writable folder, and the names fit the file system."""
    ancestor = _existing_ancestor(out.parent)
    if not ancestor.is_dir():
        raise OutputWriteError(
            f"cannot create {out}: {ancestor} is a file, not a folder",
            hint="choose an --out whose parent is a folder",
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only_fs(ancestor) else "is not writable (permission denied)"
        raise OutputWriteError(f"cannot write {out}: {ancestor} {why}", hint="choose an --out in a folder you can write to")
    longest = max(
        len(os.fsencode(out.name)) + len(".") + len(STAGING_INFIX) + len("old-") + _STAGING_RANDOM,
        len(os.fsencode(out.name)) + len(".") + len(LOCK_SUFFIX),
    )
    limit = _name_max(ancestor)
    if longest > limit:
        raise OutputWriteError(
            f"cannot write {out}: file name too long ({len(os.fsencode(out.name))} bytes; the file system allows "
            f"{limit}, and qdlm-export needs {longest - len(os.fsencode(out.name))} more for its staging folder)",
            hint="choose a shorter --out name",
        )
    for part in out.parent.relative_to(ancestor).parts:
        if len(os.fsencode(part)) > limit:
            raise OutputWriteError(f"cannot create {out}: the folder name {part!r} is too long", hint="choose a shorter --out")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output(out: str | Path, overwrite: bool, *, source: str | Path | None = None) -> Path:
    """Fail early, before any work, when ``out`` may not be written or replaced. Returns ``out``
    resolved (a symlinked ``--out`` means its target). ``source``: the source model folder, which
    must never be replaced nor contained in ``out``."""
    if not isinstance(overwrite, bool):
        from ..errors import ConfigError

        raise ConfigError(f"overwrite must be True or False, got {overwrite!r}", hint="pass overwrite=True or False")
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        from ..errors import ConfigError

        raise ConfigError(f"the output folder must be a path, got {out!r}", hint="pass --out FOLDER")
    try:  # a name that is not UTF-8 reaches Python as surrogates; safetensors cannot open such a path
        os.fsdecode(out).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputRefusedError(
            f"output folder {os.fsdecode(out)!r} is not a valid UTF-8 path",
            hint="choose an --out whose name is UTF-8 text (safetensors files cannot be written under other names)",
        ) from None
    out = _resolve(out)
    src = _resolve(source) if source is not None else None
    _check_protected(out, src)
    if os.path.lexists(out):
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a folder", hint="choose another --out")
        if not overwrite:
            raise OutputExistsError(
                f"output folder {out} already exists",
                hint="choose another --out, or pass --overwrite to replace it (only a previous qdlm-export output "
                "or an empty folder is ever replaced)",
            )
        _check_replaceable(out)
    _check_parent(out)
    return out


def _check_replaceable(out: Path) -> None:
    try:
        entries = list(out.iterdir())
    except OSError as exc:
        raise _os_error(exc, out, "reading") from None
    if not entries:
        return
    if is_staging_folder(out):
        raise _refused(out, "it is an unfinished qdlm-export staging folder")
    if not is_tool_output(out):
        shown = ", ".join(sorted(p.name for p in entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise _refused(
            out,
            f"--overwrite replaces only an empty folder or a previous qdlm-export output, and it holds other "
            f"content ({shown})",
        )
    folders = sorted(p.name for p in entries if p.is_dir() and not p.is_symlink())
    if folders:
        raise _refused(
            out, f"it is a qdlm-export output but also holds folders qdlm-export never writes ({', '.join(folders[:5])})"
        )
    foreign = sorted(p.name for p in entries
                     if (p.is_symlink() and p.is_dir()) or (not p.is_dir() and not _written_by_tool(p.name)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputRefusedError(
            f"refusing to write to {out}: it is a qdlm-export output but also holds files qdlm-export never writes "
            f"({shown}); replacing it would delete them",
            hint="move those files elsewhere and run again, or choose another --out",
        )


# What a previous output may hold and still be replaced: the files the tool writes (config, report, card,
# weights, index, the local-source note, its staging marker) and those it copies from a source model
# (source.COPIED_PATTERNS: code, tokenizer, chat template, generation config, license). Anything else
# (notes, results, a user's own files) makes --overwrite refuse rather than delete it.
_TOOL_FILES = ("config.json", REPORT_FILE, "README.md", LOCAL_SOURCE_FILE,
               INCOMPLETE_MARKER,
               "*.safetensors", "*.safetensors.index.json")


def _written_by_tool(name: str) -> bool:
    import fnmatch

    from ..quantize.source import COPIED_PATTERNS

    return any(fnmatch.fnmatchcase(name, pat) for pat in (*_TOOL_FILES, *COPIED_PATTERNS))


# ---------------------------------------------------------------------------------------------
# Errors of the operating system, in words
# ---------------------------------------------------------------------------------------------

_CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EFBIG: "file too large for the file system",
    errno.EIO: "input/output error",
}


def _os_error(exc: OSError, where: Path, doing: str = "writing", out: Path | None = None) -> OutputWriteError:
    cause = _CAUSES.get(exc.errno) or (exc.strerror or type(exc).__name__).lower()
    path = os.fsdecode(exc.filename) if exc.filename else str(where)
    if out is not None and not path.startswith(str(out)):
        path += f" (the staging folder of {out})" if path.startswith(str(where)) else f" (while writing {out})"
    hint = {
        errno.ENOSPC: "free some space (the checkpoint needs about its size in the staging folder) or choose an "
        "--out on another disk",
        errno.EDQUOT: "free some space or choose an --out on another disk",
        errno.ENAMETOOLONG: "choose a shorter --out",
    }.get(exc.errno, "choose an --out in a folder you can write to")
    return OutputWriteError(f"{cause} {doing} {path}", hint=hint)


def _is_output_failure(exc: OSError, tmp: Path, out: Path) -> bool:
    """A resource failure (disk full, read-only...) anywhere, or any OS error on a path we write."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return True
    if not exc.filename:
        return False
    try:
        path = Path(os.fsdecode(exc.filename)).absolute()
    except (TypeError, ValueError):
        return False
    return _is_relative_to(path, tmp) or path == out or path.parent == out.parent


def _oserror_in_chain(exc: BaseException) -> OSError | None:
    """An OSError raised directly or wrapped (safetensors and torch re-raise I/O errors as their own)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


# ---------------------------------------------------------------------------------------------
# Owner records: lock and marker
# ---------------------------------------------------------------------------------------------

def _owner_record() -> dict[str, Any]:
    return {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


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

    def handler(signum, frame):  # noqa: ARG001
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
                (tmp / INCOMPLETE_MARKER).write_text(json.dumps({**_owner_record(), "out": str(out)}))
            except OSError as exc:
                raise _os_error(exc, out.parent, "creating the staging folder in") from None
            try:
                yield tmp
                _apply_umask(tmp)
                signals["raise"] = False  # the final step runs to its end: a signal now is ignored
                _finish(tmp, out, overwrite, source)
            except QdlmError:
                raise
            except Exception as exc:
                os_exc = _oserror_in_chain(exc)
                if os_exc is None or not _is_output_failure(os_exc, tmp, out):
                    raise
                raise _os_error(os_exc, tmp, out=out) from exc
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
        (out / INCOMPLETE_MARKER).write_text(json.dumps({**_owner_record(), "out": str(out)}))
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
