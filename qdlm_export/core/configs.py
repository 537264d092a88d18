"""The shared bases of the method configs (weight-only, weight-activation), the calibration config,
and the checks every config runs where it is built.

Each method's own config lives beside its algorithm (``methods/rtn.py``'s ``RTNConfig``...). A config
is everything a method needs to reproduce its result. It is serialised verbatim into the
checkpoint's ``quantization_config.method_options`` (and its weight fields into ``weights``), so a
checkpoint records how it was made. ``methods/registry.py`` maps method names to config classes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ArgumentTypeError, ConfigError
from .packing import SUPPORTED_BITS
from .schemes import WeightScheme

SCALE_DTYPES = ("float16", "bfloat16", "float32")
GROUP_FALLBACKS = ("error", "per-channel")
# Calibration seeds go to torch generators (64 bits); verification also uses seed + 1.
MAX_SEED = 2**63 - 1

# Config fields with a `quantize` flag of their own; every other field is set with `-O KEY=VALUE`.
CLI_FLAGS = {
    "bits", "group_size", "symmetric", "include_lm_head", "include_router", "group_fallback", "scale_dtype", "act_bits",
    "act_granularity", "qkv_bits", "damp", "act_order", "mse_clip", "alpha",
}
CALIBRATION_FLAGS = {
    "source": "calib", "text_field": "calib-field", "masking": "calib-masking", "dataset_config": "calib-config",
    "split": "calib-split", "chat_template": "calib-chat-template", "attention": "calib-attention",
}


def option_name(field_name: str, calibration: bool = False) -> str:
    """How a user sets a config field on the command line: ``--damp`` or ``-O block_size``."""
    if calibration:
        return "--" + CALIBRATION_FLAGS.get(field_name, field_name.replace("_", "-"))
    return "--" + field_name.replace("_", "-") if field_name in CLI_FLAGS else f"-O {field_name}"


def _accepted(hint: Any) -> tuple[tuple[type, ...], str] | None:
    """(types a value may have, their description) for a field's annotation; None: not checked."""
    names = {int: "an int", float: "a number", bool: "a bool (True or False)", str: "a str", type(None): "None"}
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not all(a in names for a in args):
        return None
    return tuple(args), " or ".join(names[a] for a in args)


def _matches(value: Any, allowed: tuple[type, ...]) -> bool:
    for t in allowed:
        if t is type(None) and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return True
        if t is str and isinstance(value, str):
            return True
    return False


def check_field_values(config: Any, *, calibration: bool = False) -> None:
    """Every field of a config dataclass has its annotated type, and every number is finite (NaN and
    Inf cannot be written to config.json: strict JSON has neither). Errors name the CLI option."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        accepted = _accepted(hints.get(f.name))
        if accepted is not None and not _matches(value, accepted[0]):
            raise ArgumentTypeError(
                f"{cls.__name__} {f.name}={value!r} ({type(value).__name__}) is not {accepted[1]}",
                hint=f"pass {f.name} ({option_name(f.name, calibration)}) as {accepted[1]}",
            )
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
            raise ConfigError(
                f"{option_name(f.name, calibration)} {value} is not a finite number",
                hint=f"give {option_name(f.name, calibration)} a finite value (NaN and Inf are refused)",
            )


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Fields shared by every method: the integer format of the weights and what is quantized."""

    method: ClassVar[str] = ""

    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = True
    include_lm_head: bool = False
    # Mixture of experts: also quantize the router (kept in full precision by default: it picks the
    # experts, and its few weights barely change the checkpoint size).
    include_router: bool = False
    # What to do when group_size does not divide a layer's input size: refuse, or fall back to
    # per-channel scales for that layer only (recorded in the checkpoint's module_overrides).
    group_fallback: str = "error"
    # None: float32 for float32 sources, float16 otherwise (GPTQ/AWQ convention; bf16 is too coarse).
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        check_field_values(self)
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


EXPERT_CALIBRATIONS = ("routed", "all-tokens")
EXPERT_FALLBACKS = ("all-tokens", "rtn")


def check_expert_options(config) -> None:
    """The expert-calibration options every calibrated method shares (weight-only and W-A)."""
    if config.expert_calibration not in EXPERT_CALIBRATIONS:
        raise ConfigError(f"-O expert_calibration={config.expert_calibration!r} is invalid",
                          hint=f"choose one of {', '.join(EXPERT_CALIBRATIONS)}")
    if config.min_expert_tokens < 0:
        raise ConfigError(f"-O min_expert_tokens={config.min_expert_tokens} is invalid",
                          hint="-O min_expert_tokens accepts a token count >= 0, such as 1")


@dataclass(frozen=True)
class CalibratedWeightOnlyConfig(WeightOnlyConfig):
    """A weight-only method that calibrates (GPTQ, AWQ): how the routed experts of mixture-of-experts
    layers are calibrated (docs/calibration.md, "Experts of mixture-of-experts models"). Dense
    families ignore these fields."""

    # "all-tokens": every expert's statistics come from every token reaching the mixture-of-experts
    # block; "routed": from the tokens the router sent it. The default had the lower held-out block
    # error in 11 of 16 measured settings (docs/calibration.md).
    expert_calibration: str = "all-tokens"
    # Routed calibration only: an expert that received fewer routed tokens than this falls back to
    # ``expert_fallback`` ("all-tokens" statistics or "rtn"), listed in the report.
    min_expert_tokens: int = 1
    expert_fallback: str = "all-tokens"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expert_options(self)
        if self.expert_fallback not in EXPERT_FALLBACKS:
            raise ConfigError(f"-O expert_fallback={self.expert_fallback!r} is invalid",
                              hint=f"choose one of {', '.join(EXPERT_FALLBACKS)}")


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
            raise ConfigError(f"--act-bits {self.act_bits} is not supported", hint="--act-bits accepts 4 or 8")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ConfigError(
                f"--act-granularity {self.act_granularity!r} is invalid", hint=f"choose one of {ACT_GRANULARITIES}"
            )
        if not 0.0 < self.act_clip_ratio <= 1.0:
            raise ConfigError(
                f"-O act_clip_ratio={self.act_clip_ratio} is out of range",
                hint="act_clip_ratio accepts a fraction in (0, 1], e.g. 0.9",
            )
        if self.qkv_bits is not None and self.qkv_bits not in (4, 8):
            raise ConfigError(f"--qkv-bits {self.qkv_bits} is not supported", hint="--qkv-bits accepts 4 or 8")

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
# The attention pattern calibration windows are run with (docs/calibration.md, "Block-diffusion
# calibration"): the family's own ("auto"), block-causal with a masked current block (the sampler of
# block-diffusion models), token-causal (what autoregressive calibrators such as GPTQModel use), or
# full bidirectional attention (LLaDA, Dream: no mask is passed).
CALIB_ATTENTIONS = ("auto", "block-causal", "causal", "full", "denoising")


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into model inputs (docs/calibration.md)."""

    # "default" (shipped corpus), a .txt/.jsonl file, a folder of text files, a json/csv/parquet/arrow
    # file or a `save_to_disk` folder (read with `datasets`), or a Hub dataset id.
    source: str = "default"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    # "random": per-sample ratio t ~ U(0,1), tokens masked with prob t, as a dLLM sees its input while
    # denoising; "none": clean text, as the study did; "auto" (default): random for models with a mask
    # token (dLLMs), none for the others. Chosen by measurement (docs/calibration.md).
    masking: str = "auto"
    # The column (JSONL field) holding the text; None: "text" when present, else the only string column.
    text_field: str | None = None
    dataset_config: str | None = None  # a Hub dataset's configuration name (wikitext-2-raw-v1...)
    split: str = "train"  # the dataset split, with datasets' slicing syntax ("train[:1000]")
    # Render instruction data (a "messages" column, or prompt/response columns) with the model's chat
    # template before tokenizing.
    chat_template: bool = False
    # "auto" (default): "block-causal" for block-diffusion families (those with a block length: LLaDA2),
    # "full" for the others. "block-causal": each window's attention is bidirectional inside a block and
    # causal across blocks, with a random current block partly masked, the blocks before it clean and
    # the blocks after it masked; "causal": a token-causal mask. Chosen by measurement (docs/calibration.md).
    # Models with a causal encoder beside their denoising decoder (DiffusionGemma): "denoising" (auto) runs
    # each window as a clean context through the encoder and a noised canvas through the decoder, as the
    # sampler does; "causal" calibrates the causal encoder alone on whole windows (the peers' shortcut).
    attention: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_values(self, calibration=True)
        if self.nsamples <= 0:
            raise ConfigError(
                f"--nsamples {self.nsamples} is invalid", hint="--nsamples accepts a positive count, e.g. 128"
            )
        if self.seqlen <= 1:
            raise ConfigError(
                f"--seqlen {self.seqlen} is invalid", hint="--seqlen accepts a token count of at least 2, e.g. 512"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed {self.seed} is out of range", hint=f"--seed accepts 0 to 2**63-1 ({MAX_SEED})")
        if self.masking not in CALIB_MASKINGS:
            raise ConfigError(f"--calib-masking {self.masking!r} is invalid", hint=f"choose one of {', '.join(CALIB_MASKINGS)}")
        if self.attention not in CALIB_ATTENTIONS:
            raise ConfigError(f"--calib-attention {self.attention!r} is invalid",
                              hint=f"choose one of {', '.join(CALIB_ATTENTIONS)}")
        for name in ("source", "text_field", "dataset_config", "split"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                flag = option_name(name, calibration=True)
                raise ConfigError(f"{flag} is empty", hint=f"give {flag} a value, or leave it out for the default")

    def resolved_masking(self, mask_token_id: int | None) -> str:
        """``"random"`` or ``"none"``: what ``auto`` means for a model with (or without) a mask token."""
        if self.masking == "auto":
            return "random" if mask_token_id is not None else "none"
        return self.masking

    def resolved_attention(self, block_length: int | None, *, denoising: bool = False) -> str:
        """``"block-causal"``, ``"causal"`` or ``"full"``: what ``auto`` means for a family with (or
        without) a block-diffusion block length. Patterns that need a block length are refused without one:
        the other families attend bidirectionally over the whole sequence, and their forward need not
        take a 4-D attention mask. ``denoising``: a family with an encoder stack beside its decoder
        (``FamilyAdapter.shared_stack``), where ``auto`` is ``"denoising"`` and ``"causal"`` the encoder alone."""
        attention = self.attention
        if denoising:
            if attention == "auto":
                return "denoising"
            if attention not in ("denoising", "causal"):
                raise ConfigError(
                    f"--calib-attention {attention} does not apply to this model: it denoises a canvas with a "
                    "bidirectional decoder reading a causal encoder's cache",
                    hint="leave --calib-attention out (denoising: the path the sampler runs), or pass "
                    "--calib-attention causal to calibrate on the causal encoder alone",
                )
            return attention
        if attention == "denoising":
            raise ConfigError(
                "--calib-attention denoising applies to models with a causal encoder beside their denoising "
                "decoder (DiffusionGemma)",
                hint="leave --calib-attention out (auto)",
            )
        if attention == "auto":
            return "block-causal" if block_length else "full"
        if attention != "full" and not block_length:
            raise ConfigError(
                f"--calib-attention {attention} applies to block-diffusion models (LLaDA2), and this model "
                "attends bidirectionally over the whole sequence",
                hint="leave --calib-attention out (auto), or pass --calib-attention full",
            )
        return attention
