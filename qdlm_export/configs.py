"""One frozen dataclass per quantization method, validated where it is built.

A config is everything a method needs to reproduce its result. It is serialised verbatim into the
checkpoint's ``quantization_config.method_options`` (and its weight fields into ``weights``), so a
checkpoint records how it was made. Methods register their config class in ``methods/registry.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError
from .formats.packing import SUPPORTED_BITS
from .quantization import WeightScheme

SCALE_DTYPES = ("float16", "bfloat16", "float32")
GROUP_FALLBACKS = ("error", "per-channel")


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Fields shared by every method: the integer format of the weights and what is quantized."""

    method: ClassVar[str] = ""

    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = True
    include_lm_head: bool = False
    # What to do when group_size does not divide a layer's input size: refuse, or fall back to
    # per-channel scales for that layer only (recorded in the checkpoint's module_overrides).
    group_fallback: str = "error"
    # None: float32 for float32 sources, float16 otherwise (GPTQ/AWQ convention; bf16 is too coarse).
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(
                f"--bits {self.bits} is not supported by {self.method or 'this method'}",
                hint=f"choose one of {', '.join(map(str, SUPPORTED_BITS))}",
            )
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(
                f"--group-size {self.group_size} is invalid",
                hint="use a positive group size such as 32, 64 or 128, or -1 for per-channel scales",
            )
        if self.group_fallback not in GROUP_FALLBACKS:
            raise ConfigError(
                f"--group-fallback {self.group_fallback!r} is invalid", hint=f"choose one of {GROUP_FALLBACKS}"
            )
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"--scale-dtype {self.scale_dtype!r} is invalid", hint=f"choose one of {SCALE_DTYPES}")

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method_options(self) -> dict[str, Any]:
        """The fields beyond the shared weight format (what makes this method this method)."""
        shared = {f.name for f in dataclasses.fields(WeightOnlyConfig)}
        return {k: v for k, v in self.to_dict().items() if k not in shared}

    @classmethod
    def from_options(cls, **options: Any) -> "WeightOnlyConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"option(s) {', '.join(unknown)} do not apply to method {cls.method!r}",
                hint=f"{cls.method} accepts: {', '.join(sorted(known))}",
            )
        return cls(**options)


@dataclass(frozen=True)
class RTNConfig(WeightOnlyConfig):
    """Round to nearest: min/max scales per group, no calibration. The baseline."""

    method: ClassVar[str] = "rtn"


ACT_GRANULARITIES = ("token", "tensor")


@dataclass(frozen=True)
class WeightActivationConfig(WeightOnlyConfig):
    """Weight *and* activation quantization (SmoothQuant, QuaRot, DuQuant): weights as above, plus
    the integer format of every quantized linear's input, applied online by the loader."""

    act_bits: int = 8
    act_granularity: str = "token"  # "token": dynamic per-token scales; "tensor": one static scale
    act_symmetric: bool = True
    act_clip_ratio: float = 1.0
    qkv_bits: int | None = None  # also quantize the q/k/v projections' outputs (None: keep 16-bit)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_bits not in (4, 8):
            raise ConfigError(f"--act-bits {self.act_bits} is not supported", hint="choose 4 or 8")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ConfigError(
                f"--act-granularity {self.act_granularity!r} is invalid", hint=f"choose one of {ACT_GRANULARITIES}"
            )
        if not 0.0 < self.act_clip_ratio <= 1.0:
            raise ConfigError(f"--act-clip-ratio {self.act_clip_ratio} must be in (0, 1]")
        if self.qkv_bits is not None and self.qkv_bits not in (4, 8):
            raise ConfigError(f"--qkv-bits {self.qkv_bits} is not supported", hint="choose 4 or 8")

    def activations(self) -> dict[str, Any]:
        """The ``activations`` section of the checkpoint's quantization_config."""
        return {
            "bits": self.act_bits,
            "granularity": self.act_granularity,
            "dynamic": self.act_granularity == "token",
            "symmetric": self.act_symmetric,
            "clip_ratio": self.act_clip_ratio,
            "qkv_bits": self.qkv_bits,
        }

    def method_options(self) -> dict[str, Any]:
        shared = {f.name for f in dataclasses.fields(WeightActivationConfig)}
        return {k: v for k, v in self.to_dict().items() if k not in shared}


CALIB_MASKINGS = ("auto", "random", "none")


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into model inputs."""

    source: str = "default"  # "default" (shipped corpus), a .txt/.jsonl file, a folder, or a Hub dataset
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    # "random": per-sample ratio t ~ U(0,1), tokens masked with prob t, as a dLLM sees its input while
    # denoising; "none": clean text, as the study did; "auto" (default): random for models with a mask
    # token (dLLMs), none for the others. Chosen by measurement (docs/calibration.md).
    masking: str = "auto"
    text_field: str = "text"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nsamples <= 0:
            raise ConfigError(f"--nsamples must be positive, got {self.nsamples}")
        if self.seqlen <= 1:
            raise ConfigError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.masking not in CALIB_MASKINGS:
            raise ConfigError(f"--calib-masking {self.masking!r} is invalid", hint=f"choose one of {', '.join(CALIB_MASKINGS)}")

    def resolved_masking(self, mask_token_id: int | None) -> str:
        """``"random"`` or ``"none"``: what ``auto`` means for a model with (or without) a mask token."""
        if self.masking == "auto":
            return "random" if mask_token_id is not None else "none"
        return self.masking
