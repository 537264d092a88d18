"""The ``qdlm-export`` command line: a thin Typer layer that parses, calls the library, and renders.

No logic lives here. Each command group is one module of this package (``quantize``,
``inspect_cmd``, ``push``, ``convert``, ``bench``, ``evaluate``); options they share live in
:mod:`.options`; every failure leaves through the one table in :mod:`.error_table`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import bench, convert, evaluate, inspect_cmd, push, quantize
from .error_table import interruptible, run
from .options import EMBEDDED_DEFAULT  # noqa: F401  (tests/families/test_fixtures.py imports it from here)
from .verbosity import Quiet, Verbose, restored_after_run, set_root, with_verbosity

app = typer.Typer(
    name="qdlm-export",
    help="Quantize diffusion LLMs (LLaDA, Dream, ...) into Hub-ready checkpoints that reload with from_pretrained.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    # Plain help text: with rich markup, "[default: 4]" in a help string would be eaten as a tag.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qdlm-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Quantize diffusion LLMs into Hub-ready checkpoints."""
    set_root(verbose, quiet)  # every command adds its own -v/-q to these (cli/verbosity.py)


# (name, body, examples), in the order --help lists them; a command is named after its body unless given.
_COMMANDS = (
    (None, quantize.quantize, quantize.EXAMPLES),
    (None, inspect_cmd.inspect, inspect_cmd.EXAMPLES),
    (None, push.push, push.EXAMPLES),
    (None, convert.convert, convert.EXAMPLES),
    (None, bench.bench, bench.EXAMPLES),
    ("eval", evaluate.eval_command, evaluate.EXAMPLES),
)
for name, body, epilog in _COMMANDS:
    app.command(name, epilog=epilog)(interruptible(with_verbosity(body)))


def main() -> None:
    """Entry point: runs the app and maps every known failure to a message and exit code."""
    with restored_after_run():
        run(app)


if __name__ == "__main__":
    main()
