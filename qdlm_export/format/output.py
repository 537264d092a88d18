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
import signal
from pathlib import Path

from ..errors import OutputExistsError, QdlmError
from .spec import CARD_FILE, FORMAT_NAME, LOCAL_SOURCE_FILE, REPORT_FILE

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
    return qconfig.get("quant_method") == FORMAT_NAME or (isinstance(provenance, dict) and provenance.get("tool") == TOOL)


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
        raise os_write_error(exc, out, "reading") from None
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
# (model_files.COPIED_PATTERNS: code, tokenizer, chat template, generation config, license). Anything else
# (notes, results, a user's own files) makes --overwrite refuse rather than delete it.
_TOOL_FILES = ("config.json", REPORT_FILE, CARD_FILE, LOCAL_SOURCE_FILE, "qdlm_recipe.yaml",  # quantize/api.py
               INCOMPLETE_MARKER, INCOMPLETE_MARKER + ".tmp",
               "*.safetensors", "*.safetensors.index.json")


def _written_by_tool(name: str) -> bool:
    import fnmatch

    from .model_files import COPIED_PATTERNS

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


def os_write_error(exc: OSError, where: Path, doing: str = "writing", out: Path | None = None) -> OutputWriteError:
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


def is_output_failure(exc: OSError, tmp: Path, out: Path) -> bool:
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


def oserror_in_chain(exc: BaseException) -> OSError | None:
    """An OSError raised directly or wrapped (safetensors and torch re-raise I/O errors as their own)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
