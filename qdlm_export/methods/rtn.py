"""Round to nearest (RTN): each weight group's min/max fixes its scale; each weight goes to the
nearest code. No calibration data. Every other method is measured against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..core.configs import WeightOnlyConfig
from ..core.schemes import QuantizedWeight, quantize_rtn
from ..families import LinearGroup
from .base import BlockCalibration, QuantMethod, find_linear, qualified
from .registry import register_method


@dataclass(frozen=True)
class RTNConfig(WeightOnlyConfig):
    """Round to nearest: min/max scales per group, no calibration. The baseline."""

    method: ClassVar[str] = "rtn"


@register_method
class RTN(QuantMethod):
    display_name = "RTN (round-to-nearest)"
    name = "rtn"
    config_class = RTNConfig
    needs_calibration = False

    def quantize_groups(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, QuantizedWeight]:
        results = {}
        for name in (name for group in groups for name in group.linears):
            linear = find_linear(block, name)
            full_name = qualified(prefix, name)
            scheme = self.layer_scheme(full_name, linear.in_features)
            qweight = quantize_rtn(linear.weight.data, scheme, self.scale_dtype, bias=linear.bias)
            if calib is not None:  # only needed when later blocks are calibrated on these outputs
                self.load_quantized(linear, qweight)
            results[full_name] = qweight
        return results
