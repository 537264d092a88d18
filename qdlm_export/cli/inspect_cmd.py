"""``qdlm-export inspect``: describe and validate a checkpoint, and show each layer's kernel backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .console import human_size, out
from .options import (
    JsonDescription,
    Revision,
    examples,
    int_range,
    report_device_option,
)

EXAMPLES = examples(
    "qdlm-export inspect llada-w4", "qdlm-export inspect llada-w4 --json", "qdlm-export inspect me/llada-w4 --revision w4-g128"
)
Checkpoint = Annotated[
    str, typer.Argument(metavar="FOLDER", help="A checkpoint folder written by `qdlm-export quantize`, or its Hub id (owner/name).")
]


def inspect(
    checkpoint: Checkpoint,
    device: Annotated[
        Optional[str],
        typer.Option(help="Device to report kernel backends for: cpu, cuda or cuda:N [default: cuda when available].", callback=report_device_option),
    ] = None,
    tokens: Annotated[int, typer.Option(help="Rows (batch x sequence) to report kernel backends for (at least 1).", callback=int_range(1))] = 256,
    revision: Revision = None,
    as_json: JsonDescription = False,
) -> None:
    """Describe a checkpoint, validate that every promised tensor exists with the right dtype and shape,
    and show which kernel backend each layer would use (reads headers only; never runs model code)."""
    from ..format.validation import inspect_checkpoint
    from ..hub.download import local_checkpoint

    folder = local_checkpoint(checkpoint, revision=revision)
    info = inspect_checkpoint(folder, device=device, tokens=tokens)
    from ..loader.kernel_choice import kernel_plans

    info.kernels = kernel_plans(folder, device=info.kernel_device, tokens=info.kernel_tokens)
    if as_json:
        typer.echo(json.dumps({**info.to_dict(), "valid": True}, indent=2))
        return
    sym = "symmetric" if info.symmetric else "asymmetric"
    downloaded = folder != Path(checkpoint).expanduser()
    table = Table(title=checkpoint if downloaded else str(folder), show_header=False)
    table.add_row("method", info.method)
    table.add_row("weights", f"{info.bits}-bit, group {info.group_size}, {sym}, scales {info.scale_dtype}")
    table.add_row("activations", json.dumps(info.activations) if info.activations else "full precision")
    table.add_row("family", str(info.family))
    table.add_row("quantized linears", str(len(info.quantized_modules)))
    table.add_row("kept in full precision", ", ".join(info.modules_not_converted) or "-")
    for label, text in info.layout_rows():  # fused experts and a shared layer stack, where the model has them
        table.add_row(label, text)
    if info.module_overrides:
        table.add_row("per-module overrides", ", ".join(f"{k}: {v}" for k, v in info.module_overrides.items()))
    table.add_row("bits per weight", f"{info.bits_per_weight:.3f}")
    table.add_row("weights on disk", human_size(info.checkpoint_bytes))
    table.add_row("validation", "[green]ok[/green]: every tensor present with the expected dtype and shape")
    groups: dict[str, int] = {}
    for plan in info.kernels.values():
        groups[plan] = groups.get(plan, 0) + 1
    for i, (plan, count) in enumerate(groups.items()):
        label = f"kernels ({info.kernel_device}, M={info.kernel_tokens})" if i == 0 else ""
        table.add_row(label, f"{count} linear{'s' if count != 1 else ''}: {plan}", end_section=False)
    out.print(table)
