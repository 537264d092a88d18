"""SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights.

For each group of linears that read the same input ``X`` (the adapter's groups), one scale per
input channel ``j``

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)        (alpha = 0.5 by default)

divides the input and multiplies the weights' columns: ``(X / s)(W s)^T = X W^T``. ``max|W|`` is
taken over every linear of the group (they all see the smoothed input). The study (QDLM) smooths
all four groups of a block, as AWQ pairs them: norm -> q/k/v, v -> attention output,
norm -> gate/up, up -> down.

Where the division can be folded offline it is: into the norm's gain (``norm -> ...`` groups) or
into the rows of the previous linear (``v -> o``, ``up -> down``: attention and the SiLU gate act
per channel, so a per-channel scale of their input channel passes through). It cannot when the
previous linear's outputs are not the group's inputs one to one -- Dream's ``v -> o`` under GQA,
where each value head serves several query heads -- and then the scale is stored
(``NAME.input_smooth``) and divided online, as the study does.

The smoothed inputs are then quantized per token (asymmetric, as in the study) and the weights per
output channel (RTN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..core.configs import WeightActivationConfig
from ..core.transforms import SMOOTH_TENSOR
from ..errors import ConfigError
from ..families import LinearGroup
from .base import BlockCalibration, find_linear
from .folding import fold_scale
from .registry import register_method
from .weight_activation import GroupInputStats, LinearPlan, WeightActivationMethod, collect_group_inputs

SCALE_MIN = 1e-5  # floor of max|X|, max|W| and s (dead channels would otherwise give 0 or inf)


@dataclass(frozen=True)
class SmoothQuantConfig(WeightActivationConfig):
    """SmoothQuant with the study's settings: W8A8, per-channel asymmetric weights, per-token
    asymmetric activations, alpha 0.5."""

    method: ClassVar[str] = "smoothquant"

    bits: int = 8
    group_size: int = -1
    symmetric: bool = False
    act_symmetric: bool = False
    alpha: float = 0.5  # migration strength: 0 keeps activations, 1 moves everything into weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha {self.alpha} must be in [0, 1]", hint="the study uses 0.5")


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel (float32)."""
    act = act_absmax.float().clamp(min=SCALE_MIN)
    w = torch.stack([weight.detach().float().abs().amax(0) for weight in weights]).amax(0).clamp(min=SCALE_MIN)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_MIN)


def online_smoothing(s: torch.Tensor) -> LinearPlan:
    """The input divided by ``s`` at run time (``TransformedLinear`` multiplies the weight by ``s``)."""
    return LinearPlan(ops=[{"op": "smooth"}], tensors={SMOOTH_TENSOR: s.float().cpu()})


def smooth_block(
    block: nn.Module,
    groups: tuple[LinearGroup, ...],
    stats: dict[LinearGroup, GroupInputStats],
    alpha: float,
    fold: bool = True,
) -> dict[LinearGroup, tuple[torch.Tensor, LinearPlan]]:
    """Smooth every group of a block; returns each group's scales and online plan."""
    result = {}
    for group in groups:
        weights = [find_linear(block, name).weight for name in group.linears]
        s = smoothing_scales(stats[group].absmax, weights, alpha)
        # Folded into the norm gain or the previous linear's rows where exact, online otherwise.
        realised = fold_scale(block, group, s) if fold else None
        result[group] = (s, online_smoothing(s)) if realised is None else (realised, LinearPlan())
    return result


@register_method
class SmoothQuant(WeightActivationMethod):
    display_name = "SmoothQuant"
    name = "smoothquant"
    config_class = SmoothQuantConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.online_smoothing: list[str] = []

    def method_needs_calibration(self) -> bool:
        return True  # max|X| per channel comes from calibration data

    def plan_block(self, block: nn.Module, prefix: str, calib: BlockCalibration | None) -> dict[str, LinearPlan]:
        if calib is None or len(calib) == 0:
            raise ValueError("SmoothQuant needs calibration inputs for every block")
        groups = self.adapter.groups
        stats = collect_group_inputs(block, groups, calib)
        smoothed = smooth_block(block, groups, stats, self.config.alpha)
        plans = {}
        for group, (_, plan) in smoothed.items():
            for name in group.linears:
                plans[name] = plan
                if plan.ops:
                    self.online_smoothing.append(f"{prefix}.{name}")
        return plans

    def transform_metadata(self) -> dict[str, Any]:
        return {"offline": {"kind": "smoothquant", "alpha": self.config.alpha, "folded": "norms and previous linears",
                            "online_smoothing": list(self.online_smoothing)}}
