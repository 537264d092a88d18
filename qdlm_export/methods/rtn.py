"""Round to nearest (RTN): each weight group's min/max fixes its scale; each weight goes to the
nearest code. No calibration data. Every other method is measured against it."""

from __future__ import annotations

import torch.nn as nn

from ..core.configs import RTNConfig
from ..core.schemes import QuantizedWeight, quantize_rtn
from .base import BlockCalibration, QuantMethod, find_linear
from .registry import register_method


@register_method
class RTN(QuantMethod):
    name = "rtn"
    config_class = RTNConfig
    needs_calibration = False

    def quantize_block(
        self, block: nn.Module, prefix: str, calib: BlockCalibration | None
    ) -> dict[str, QuantizedWeight]:
        results = {}
        for name in self.adapter.linear_names:
            linear = find_linear(block, name)
            full_name = f"{prefix}.{name}"
            scheme = self.layer_scheme(full_name, linear.in_features)
            qweight = quantize_rtn(linear.weight.data, scheme, self.scale_dtype, bias=linear.bias)
            if calib is not None:  # only needed when later blocks are calibrated on these outputs
                self.load_quantized(linear, qweight)
            results[full_name] = qweight
        return results
