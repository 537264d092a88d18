"""``qdlm-export convert``: a native checkpoint to GPTQ, AWQ or compressed-tensors."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .console import out
from .progress_bars import progress_bars
from .options import (
    ConvertTarget,
    JsonResult,
    MaxShardSize,
    OutDir,
    Overwrite,
    Revision,
    examples,
)

EXAMPLES = examples(
    "qdlm-export convert llada-w4 --to compressed-tensors --out llada-w4-ct",
    "qdlm-export convert llada-w4 --to gptq --out llada-w4-gptq",
)


def convert(
    checkpoint: Annotated[str, typer.Argument(metavar="FOLDER", help="A native checkpoint written by `qdlm-export quantize`, or its Hub id (owner/name).")],
    to: Annotated[ConvertTarget, typer.Option("--to", help="Target format.")] = ...,
    out_dir: OutDir = ...,
    overwrite: Overwrite = False,
    max_shard_size: MaxShardSize = "5GB",
    revision: Revision = None,
    as_json: JsonResult = False,
) -> None:
    """Convert a native checkpoint to GPTQ, AWQ or compressed-tensors; refuses what the format cannot
    express (tensors and configs only; never runs model code)."""
    from ..exports.convert import convert as run_convert
    from ..format.validation import read_quantization_config
    from ..hub.download import local_checkpoint

    folder = local_checkpoint(checkpoint, revision=revision)
    read_quantization_config(folder)  # a clear error if FOLDER is not a native checkpoint
    with progress_bars(disable=as_json):
        result = run_convert(folder, out_dir, to, overwrite=overwrite, max_shard_bytes=max_shard_size)
    if as_json:
        typer.echo(json.dumps({"out": str(result), "format": to}))
    else:
        out.print(f"Wrote {to} checkpoint {result}", highlight=False, soft_wrap=True)
