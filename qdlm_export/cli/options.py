"""Options shared by the commands: closed choices, value checks (click callbacks), and aliases for
options several commands take with the same name and help text.

Closed choices come from the registries they belong to; click lists them in --help and refuses
anything else with the accepted values (exit 2, with the usage line).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ..core.configs import (
    ACT_GRANULARITIES,
    CALIB_MASKINGS,
    GROUP_FALLBACKS,
    SCALE_DTYPES,
)
from ..exports.convert import FORMATS, TARGETS
from ..methods import available_methods

EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "assets" / "tiny-llada"

MethodName = Literal[tuple(available_methods())]  # type: ignore[valid-type]
OutputFormat = Literal[FORMATS]  # type: ignore[valid-type]
ConvertTarget = Literal[TARGETS]  # type: ignore[valid-type]
ScaleDtype = Literal[SCALE_DTYPES]  # type: ignore[valid-type]
GroupFallback = Literal[GROUP_FALLBACKS]  # type: ignore[valid-type]
ActGranularity = Literal[ACT_GRANULARITIES]  # type: ignore[valid-type]
CalibMasking = Literal[CALIB_MASKINGS]  # type: ignore[valid-type]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
EvalDtype = Literal["auto", "float32", "bfloat16", "float16"]

# lm-eval also seeds numpy with --seed, and numpy takes 32 bits.
MAX_EVAL_SEED = 2**32 - 1


def examples(*lines: str) -> str:
    """An epilog of example command lines, kept verbatim by click (the \\b marker stops rewrapping)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


# ------------------------------------------------------------------------------ sizes
# transformers' convention (save_pretrained(max_shard_size=...)): KB/MB/GB/TB are powers of 10,
# KiB/MiB/GiB/TiB powers of 2, a plain number is bytes.
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
SIZE_HELP = "a positive size: 500MB or 5GB (powers of 10), 5GiB (powers of 2), or a number of bytes"


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    """``"5GB"`` -> 5*10**9, ``"5GiB"`` -> 5*2**30, ``"123"`` -> 123 bytes. Anything else (zero,
    negative, non-finite, an unknown unit) -> ``ConfigError`` naming ``option``."""
    from ..errors import ConfigError

    match = _SIZE_RE.match(str(text))
    unit = match.group(2) if match else ""
    if match and unit[-1:] == "b" and not unit.upper().endswith("IB"):
        raise ConfigError(
            f"{option} {text!r}: a lowercase b means bits", hint=f"write bytes with a capital B; {option} takes {SIZE_HELP}"
        )
    if not match or unit.upper() not in _SIZE_UNITS:
        raise ConfigError(f"{option} {text!r} is not a size", hint=f"{option} takes {SIZE_HELP}")
    value = float(match.group(1)) * _SIZE_UNITS[unit.upper()]
    if not math.isfinite(value) or int(value) < 1:
        raise ConfigError(f"{option} {text!r} is not a positive size", hint=f"{option} takes {SIZE_HELP}")
    return int(value)


def size_option(value: str) -> int:
    from ..errors import ConfigError

    try:
        return parse_size(value)
    except ConfigError as exc:
        bits = " (a lowercase b means bits; write B for bytes)" if "lowercase" in exc.message else ""
        raise typer.BadParameter(f"{value!r} is not {SIZE_HELP}{bits}") from None


# ------------------------------------------------------------------------------ numbers
def int_range(low: int, high: Optional[int] = None, high_text: Optional[str] = None):
    """A callback refusing integers outside [low, high], naming the value and the accepted range."""
    accepted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high_text or high}"

    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and (value < low or (high is not None and value > high)):
            raise typer.BadParameter(f"{value} is out of range; accepted: {accepted}")
        return value

    return check


def finite(value: Optional[float]) -> Optional[float]:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def limit_option(value: Optional[float]) -> Optional[float]:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is invalid; accepted: a positive number of examples, or a fraction in (0, 1)")
    return value


# ------------------------------------------------------------------------------ devices
def _check_device(value: Optional[str], *, allow_auto: bool = True, need_available: bool = True) -> Optional[str]:
    if value is None:
        return None
    device = value.strip().lower()
    from ..core.arguments import DEVICE_PATTERN

    match = DEVICE_PATTERN.match(device)
    accepted = "cpu, cuda, cuda:N" + (" or auto" if allow_auto else "")
    if not match or (device == "auto" and not allow_auto):
        raise typer.BadParameter(f"{value!r} is not a device; accepted: {accepted}")
    if device.startswith("cuda") and need_available:
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter(
                f"{value} was asked for, but no CUDA device is available here; use cpu" + (" or auto" if allow_auto else "")
            )
        index = match.group(2)
        if index is not None and int(index) >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise typer.BadParameter(f"{value}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return device


def device_option(value: Optional[str]) -> Optional[str]:
    """quantize: cpu, cuda, cuda:N or auto."""
    return _check_device(value)


def run_device_option(value: Optional[str]) -> Optional[str]:
    """bench and eval: cpu, cuda or cuda:N (nothing: cuda when available)."""
    return _check_device(value, allow_auto=False)


def report_device_option(value: Optional[str]) -> Optional[str]:
    """inspect reports the kernels a device would use; the device need not be here."""
    return _check_device(value, allow_auto=False, need_available=False)


# ------------------------------------------------------------------------------ shared aliases
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")]
Overwrite = Annotated[bool, typer.Option(help="Replace --out if it exists.")]
MaxShardSize = Annotated[
    str, typer.Option(help="Largest safetensors shard: 5GB = 5*10^9 bytes, 5GiB = 5*2^30 bytes, a plain number is bytes.", callback=size_option)
]
CheckpointFolder = Annotated[Path, typer.Argument(metavar="FOLDER", help="A checkpoint folder written by `qdlm-export quantize`.")]
RunDevice = Annotated[
    Optional[str], typer.Option(help="cpu, cuda or cuda:N [default: cuda when available].", callback=run_device_option)
]
TrustCheckpointCode = Annotated[
    bool, typer.Option(help="Allow the checkpoint's and its original's own modeling code (LLaDA, Dream). Review it first.")
]


def as_json_flag(what: str):
    """``--json``: print ``what`` (e.g. "the summary") as JSON instead of a table."""
    return Annotated[bool, typer.Option("--json", help=f"Print {what} as JSON.")]


JsonSummary = as_json_flag("the summary")
JsonResult = as_json_flag("the result")
JsonResults = as_json_flag("the results")
JsonDescription = as_json_flag("the description")
# A checkpoint argument that may be a Hub id (hub/download.py) takes its revision here.
Revision = Annotated[
    Optional[str], typer.Option(help="Branch, tag or commit to download when the checkpoint is a Hub id [default: main].")
]
