"""``-v``/``-q``: what reaches stderr. The library only logs (``logging.getLogger(__name__)``); the
command line decides what shows, through one rich handler on stderr (stdout stays for results, so
``--json`` output parses):

    -q      errors only, no progress bars
    (none)  warnings, progress bars
    -v      + the library's INFO lines; third-party warnings, lm-eval's INFO and their progress bars
    -vv     + the library's DEBUG lines and third-party INFO lines

Every command takes ``-v``/``-q`` after its name; the root takes them too (``qdlm-export -q quantize``),
and the two add up. Third-party chatter (transformers, datasets and huggingface_hub progress bars,
lm-eval's INFO, torchao) stays off unless ``-v``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import warnings
from typing import Annotated, get_type_hints

import typer

from .console import err

Verbose = Annotated[
    int, typer.Option("--verbose", "-v", count=True, help="More on stderr: -v the library's progress lines and third-party logs, -vv debug lines.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Errors only on stderr: no warnings, no progress bars.")]

# Loggers of libraries whose INFO/WARNING lines a user cannot act on in a normal run.
_THIRD_PARTY = ("datasets", "huggingface_hub", "lm_eval", "torchao", "accelerate", "filelock", "httpx", "urllib3")

_root_level = {"verbose": 0, "quiet": False}  # from the root callback, before the command's own
_state = {"verbosity": 0}


def set_root(verbose: int, quiet: bool) -> None:
    _root_level.update(verbose=verbose, quiet=quiet)


def verbosity() -> int:
    """-1 quiet, 0 default, 1 -v, 2 -vv (as last configured)."""
    return _state["verbosity"]


def progress_enabled() -> bool:
    """Progress bars: on stderr, off with -q (rich draws nothing when stderr is not a terminal)."""
    return _state["verbosity"] >= 0


def configure(verbose: int = 0, quiet: bool = False) -> int:
    """Install the stderr handler and the levels for this run; returns the verbosity (-1..2)."""
    verbose += _root_level["verbose"]
    quiet = quiet or _root_level["quiet"]
    level = -1 if quiet else min(verbose, 2)
    _state["verbosity"] = level
    from rich.logging import RichHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_qdlm_cli", False):
            root.removeHandler(handler)
    handler = RichHandler(console=err, show_time=False, show_path=level >= 2, markup=False, rich_tracebacks=False)
    handler._qdlm_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    library = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[level]
    root.setLevel(logging.ERROR if level < 0 else logging.WARNING if level == 0 else logging.INFO)
    logging.getLogger("qdlm_export").setLevel(library)
    logging.captureWarnings(True)  # warnings.warn from any library: through the same handler and levels
    warnings.formatwarning = _format_warning
    _third_party(level)
    return level


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a user reads it: ours is its message (it names the file or option concerned);
    another library's says where it came from, without the source line Python would print."""
    if f"{os.sep}qdlm_export{os.sep}" in str(filename):
        return str(message)
    return f"{category.__name__}: {message} ({os.path.basename(str(filename))}:{lineno})"


def _third_party(level: int) -> None:
    chatty = level >= 1
    # -v: their warnings (lm-eval's INFO too); -vv: their INFO lines (transformers dumps configs there)
    own = logging.ERROR if not chatty else logging.WARNING if level == 1 else logging.INFO
    for name in _THIRD_PARTY:
        found = logging.getLogger(name)
        found.setLevel(logging.INFO if chatty and name == "lm_eval" else own)
        for extra in [h for h in found.handlers if type(h) is logging.StreamHandler]:
            found.removeHandler(extra)  # their own stderr handler (huggingface_hub's): ours shows it once
    # lm-eval sets its logger's level from this variable when an evaluation starts.
    os.environ["LMEVAL_LOG_LEVEL"] = "INFO" if chatty else "ERROR"
    if level < 0:
        os.environ["TQDM_DISABLE"] = "1"  # bars drawn with tqdm (lm-eval, the qdlm lm-eval model)
    else:
        os.environ.pop("TQDM_DISABLE", None)
    if not chatty:
        warnings.filterwarnings("ignore", module=r"torchao(\.|$)")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()  # through our handler instead of its own
        hf_logging.enable_propagation()
        hf_logging.set_verbosity(own)
        (hf_logging.enable_progress_bar if chatty else hf_logging.disable_progress_bar)()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if chatty else disable_progress_bars)()
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if chatty else datasets.disable_progress_bars)()
    else:  # read by datasets when it is imported
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "0" if chatty else "1"


def with_verbosity(body):
    """``body`` as a command that also takes ``-v``/``-q`` and configures logging before it runs."""
    signature = inspect.signature(body, eval_str=True)
    extra = [
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=Verbose),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Quiet),
    ]
    clash = {"verbose", "quiet"} & set(signature.parameters)
    if clash:
        raise RuntimeError(f"{body.__name__} already has {sorted(clash)}")

    @functools.wraps(body)
    def command(*args, verbose: int = 0, quiet: bool = False, **kwargs):
        configure(verbose, quiet)
        return body(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    command.__annotations__ = {**get_type_hints(body, include_extras=True), "verbose": Verbose, "quiet": Quiet}
    return command


_ENV = ("LMEVAL_LOG_LEVEL", "TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS")


class restored_after_run:
    """The process's logging set-up as it was before a command (the CLI run in process, by tests or
    by a Python caller of ``main()``, leaves no handler, level or filter behind)."""

    def __enter__(self):
        names = ("", "qdlm_export", "transformers", *_THIRD_PARTY)
        self.loggers = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
                        for n in names}
        self.env = {k: os.environ.get(k) for k in _ENV}
        self.filters = list(warnings.filters)
        self.formatwarning = warnings.formatwarning
        self.captured = getattr(logging, "_warnings_showwarning", None) is not None
        from huggingface_hub.utils import are_progress_bars_disabled
        from transformers.utils import logging as hf_logging

        self.hub_bars = not are_progress_bars_disabled()
        self.hf_bars = hf_logging.is_progress_bar_enabled()
        return self

    def __exit__(self, *exc):
        for name, (level, handlers, propagate) in self.loggers.items():
            found = logging.getLogger(name)
            found.setLevel(level)
            found.handlers[:] = handlers
            found.propagate = propagate
        for key, value in self.env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        warnings.filters[:] = self.filters
        warnings.formatwarning = self.formatwarning
        logging.captureWarnings(self.captured)
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
        from transformers.utils import logging as hf_logging

        (enable_progress_bars if self.hub_bars else disable_progress_bars)()
        (hf_logging.enable_progress_bar if self.hf_bars else hf_logging.disable_progress_bar)()
        _root_level.update(verbose=0, quiet=False)
        _state["verbosity"] = 0
        return False
