"""The one table from failures to messages and exit codes, for every command.

Every user-fixable problem arrives as a ``QdlmError`` (its own exit code and hint) or a usage error
from click (exit 2, with the usage line); OS errors, running out of memory and interrupts get a
sentence and a next step; anything else is an internal error (exit 3). Tracebacks appear only with
``QDLM_DEBUG=1``.
"""

from __future__ import annotations

import errno
import functools
import os
import sys

import typer

from .console import err


class Interrupted(Exception):
    """A ``KeyboardInterrupt`` (Ctrl-C, or ``output.Terminated`` for SIGTERM/SIGHUP) carried past
    click, which would otherwise turn it into a bare exit code 130 and lose the signal number."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def interruptible(func):
    """``func`` as a command body that hands interrupts to :func:`run` intact."""

    @functools.wraps(func)
    def guarded(*a, **kw):
        try:
            return func(*a, **kw)
        except KeyboardInterrupt as exc:
            raise Interrupted(exc) from exc

    return guarded


def _render_error(message: str, hint: str | None, code: int) -> int:
    err.print("[bold red]error:[/bold red] ", end="", highlight=False)
    err.print(message, highlight=False, markup=False, soft_wrap=True)
    if hint:
        err.print("[yellow]hint:[/yellow] ", end="", highlight=False)
        err.print(hint, highlight=False, markup=False, soft_wrap=True)
    return code


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """click's exception base as Typer raises it: Typer 0.29 bundles its own copy of click (its
    ``ClickException`` is not ``click.ClickException``); older Typers use click itself. Found through
    ``typer.BadParameter``'s ancestry, so either layout works."""
    found: list[type[BaseException]] = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:  # pragma: no cover - Typer without a separate click
        pass
    return tuple(dict.fromkeys(found))


def _exit_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [typer.Exit]
    try:
        import click

        found.append(click.exceptions.Exit)
    except ImportError:  # pragma: no cover
        pass
    return tuple(dict.fromkeys(found))


def _abort_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [typer.Abort]
    try:
        import click

        found.append(click.exceptions.Abort)
    except ImportError:  # pragma: no cover
        pass
    return tuple(dict.fromkeys(found))


def _attach_usage_context(exc: BaseException, app: typer.Typer) -> None:
    """click's parser raises some usage errors ("Option '--out' requires an argument") without the
    command's context, so they would print without the usage line: rebuild it from the command line."""
    if not hasattr(exc, "ctx") or exc.ctx is not None:
        return
    try:
        group = typer.main.get_command(app)
        ctx = type(group).context_class(group, info_name="qdlm-export", **group.context_settings)
        for arg in sys.argv[1:]:
            sub = None if arg.startswith("-") else group.get_command(ctx, arg)
            if sub is not None:
                ctx = type(sub).context_class(sub, info_name=arg, parent=ctx)
                break
        exc.ctx, exc.cmd = ctx, ctx.command
    except Exception:  # pragma: no cover - the message still shows, only without the usage line
        pass


# errno -> (what happened, what to do next). The message names the path from the exception.
_RESOURCE_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose an --out on another disk, then run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose an --out on another disk, then run again"),
    errno.EROFS: ("read-only file system", "choose an --out on a writable file system"),
    errno.EACCES: ("permission denied", "check the permissions of that path, or choose another folder"),
    errno.EPERM: ("operation not permitted", "check the permissions of that path, or choose another folder"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path; a folder was expected there"),
    errno.EISDIR: ("is a folder, not a file", "check the path; a file was expected there"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again"),
    errno.EXDEV: ("cannot move across file systems", "choose an --out on the same disk as its parent folder"),
}

_OOM_MARKERS = ("bad_alloc", "DefaultCPUAllocator: can't allocate", "out of memory", "not enough memory",
                "Cannot allocate memory")
# What shrinks memory depends on the command that ran out of it.
_OOM_HINTS = {
    "quantize": "use fewer or shorter calibration sequences (--nsamples, --seqlen), a smaller --batch-size, "
    "or a machine with more memory",
    "eval": "use a smaller --mc-num or --batch-size, or a machine with more memory",
    "bench": "use a shorter --seqlen or --quick, or a machine with more memory",
}
_OOM_HINT_OTHER = "free memory (close other programs) or use a machine with more memory"


def _oom_hint() -> str:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    return _OOM_HINTS.get(command or "", _OOM_HINT_OTHER)


def _out_from_argv() -> str | None:
    """The ``--out`` of this command line, to name where a write failed when the OS did not say."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg in ("--out", "-o") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def _os_error_message(exc: OSError) -> tuple[str, str]:
    what, hint = _RESOURCE_ERRORS.get(exc.errno or -1, (exc.strerror or type(exc).__name__, ""))
    paths = [p for p in (exc.filename, getattr(exc, "filename2", None)) if p is not None]
    where = " -> ".join(os.fsdecode(p) if isinstance(p, (bytes, os.PathLike)) else str(p) for p in paths)
    if where:
        return f"{what} at {where}", hint or "check that path"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and _out_from_argv():
        return f"{what} while writing --out {_out_from_argv()}", hint
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"network error: {exc}", "check the connection (or set HF_HUB_OFFLINE=1 for local models) and run again"
    detail = str(exc)
    return (f"{what}: {detail}" if detail and detail != what else what), hint or "check the files and folders involved"


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS)


def _interrupted_code(exc: BaseException) -> int:
    signum = getattr(exc, "signum", None)
    return 128 + int(signum) if isinstance(signum, int) and signum > 0 else 130


def run(app: typer.Typer) -> None:
    """Run ``app`` and map every known failure to a message and exit code (``sys.exit``)."""
    from ..errors import QdlmError

    debug = os.environ.get("QDLM_DEBUG") == "1"
    try:
        code = app(standalone_mode=False, prog_name="qdlm-export")
        if code == 130:  # click turns a Ctrl-C outside a command into exit code 130
            sys.exit(_render_error("interrupted; no output was left behind", None, 130))
        if isinstance(code, int) and code:
            sys.exit(code)
    except SystemExit:
        raise
    except Interrupted as exc:
        sys.exit(_render_error("interrupted; no output was left behind", None, _interrupted_code(exc.original)))
    except KeyboardInterrupt as exc:
        sys.exit(_render_error("interrupted; no output was left behind", None, _interrupted_code(exc)))
    except QdlmError as exc:
        if debug:
            raise
        sys.exit(_render_error(exc.message, exc.hint, exc.exit_code))
    except _exit_types() as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except _abort_types():
        sys.exit(_render_error("aborted", None, 130))
    except _usage_error_types() as exc:  # usage errors: click renders the usage line and the option
        _attach_usage_context(exc, app)
        exc.show()
        sys.exit(exc.exit_code)
    except OSError as exc:
        if debug:
            raise
        if exc.errno == errno.EPIPE:  # the reader of our output went away (| head)
            sys.exit(1)
        message, hint = _os_error_message(exc)
        sys.exit(_render_error(message, hint, 1))
    except Exception as exc:
        if debug:
            raise
        if _is_out_of_memory(exc):
            sys.exit(_render_error(f"out of memory ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})", _oom_hint(), 1))
        sys.exit(
            _render_error(
                f"internal error: {type(exc).__name__}: {exc}",
                "this is a bug in qdlm-export; re-run with QDLM_DEBUG=1 for the traceback and report it",
                3,
            )
        )
