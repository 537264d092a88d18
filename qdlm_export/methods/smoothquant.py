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

from ..core.transforms import SMOOTH_TENSOR
from ..errors import ConfigError
from ..families import FamilyAdapter, LinearGroup
from .base import BlockCalibration, find_linear
from .folding import fold_scale, fold_scale_into_readers, fold_scale_into_rows, norm_can_take
from .registry import register_method
from .shared_inputs import norm_readers, router_of, value_rows
from .weight_activation import BlockInputs, LinearPlan, MoEWeightActivationConfig, WeightActivationMethod

SCALE_MIN = 1e-5  # floor of max|X|, max|W| and s (dead channels would otherwise give 0 or inf)


@dataclass(frozen=True)
class SmoothQuantConfig(MoEWeightActivationConfig):
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
    inputs: BlockInputs,
    alpha: float,
    fold: bool = True,
    *,
    adapter: FamilyAdapter,
    model_config: Any,
) -> dict[LinearGroup, tuple[torch.Tensor, LinearPlan]]:
    """Smooth every group of a block; returns each group's scales and online plan.

    The groups reading one norm (in a mixture-of-experts layer: every routed expert's gate/up, the
    shared expert's, and the full-precision router) share one scale: from the largest ``max|X|``
    any of them saw and the largest ``max|W|`` over all their quantized weights' columns (the
    router's weight is not quantized, so its range does not enter). Folded into the norm, it
    multiplies every reader's columns, the router's included, so routing is unchanged."""
    router = router_of(adapter, block, groups)
    result: dict[LinearGroup, tuple[torch.Tensor, LinearPlan]] = {}
    for group in groups:
        if group in result:
            continue
        if group.norm is not None:
            readers = tuple(g for g in groups if g.norm == group.norm)
            linears, extra = norm_readers(block, groups, group.norm, router)
            act = torch.stack([inputs.stats[g].absmax for g in readers]).amax(0)
            s = smoothing_scales(act, [lin.weight for lin in linears], alpha)
            norm = block.get_submodule(group.norm)
            realised = fold_scale_into_readers(norm, linears + extra, s) if fold and norm_can_take(
                norm, linears[0].in_features) else None
            for g in readers:
                result[g] = (s, online_smoothing(s)) if realised is None else (realised, LinearPlan())
            continue
        weights = [find_linear(block, name).weight for name in group.linears]
        s = smoothing_scales(inputs.stats[group].absmax, weights, alpha)
        realised = None
        if fold:
            rows = value_rows(adapter, model_config, groups, group.prev_linear) if group.prev_linear else None
            if rows is None:
                realised = fold_scale(block, group, s)  # None where the previous linear cannot take it
            elif rows.stop - rows.start == weights[0].shape[1]:
                # The v rows of a fused q/k/v linear, one to one with the attention output's inputs
                # (no grouped-query sharing of value heads).
                realised = fold_scale_into_rows(find_linear(block, group.prev_linear), rows,
                                                [find_linear(block, n) for n in group.linears], s)
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

    def plan_block(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, LinearPlan]:
        if calib is None or len(calib) == 0:
            raise ValueError("SmoothQuant needs calibration inputs for every block")
        inputs = self.block_inputs(block, prefix, groups, calib)
        smoothed = smooth_block(block, groups, inputs, self.config.alpha, adapter=self.adapter,
                                model_config=self.model_config)
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
