"""Where the commands write: results to stdout, progress and errors to stderr (so ``--json`` output
stays parseable), and the byte sizes they show."""

from __future__ import annotations

from rich.console import Console

out = Console()
err = Console(stderr=True)


def human_size(n: float) -> str:
    """Binary units for the terminal: 1536 -> '1.5 KB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"
