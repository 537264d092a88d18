"""RTN-WA: RTN weights plus the activation quantizer, no transforms -- the baseline SmoothQuant,
QuaRot and DuQuant are measured against. Step 1 of the framework (``weight_activation.py``) does
nothing here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .registry import register_method
from .weight_activation import MoEWeightActivationConfig, WeightActivationMethod


@dataclass(frozen=True)
class RTNWAConfig(MoEWeightActivationConfig):
    """RTN weights + the activation quantizer, no transforms: the W8A8/W4A4 baseline."""

    method: ClassVar[str] = "rtn-wa"

    bits: int = 8
    group_size: int = -1  # per output channel, as every W/A method of the study


@register_method
class RTNWA(WeightActivationMethod):
    """RTN weights + activation quantization, nothing else (``rtn-wa``)."""

    name = "rtn-wa"
    config_class = RTNWAConfig
