"""The weight-activation framework: what ``rtn-wa``, ``smoothquant``, ``quarot`` and ``duquant`` share.

Every weight-activation method runs the same three steps per decoder block; they differ only in step 1:

1. **Transform** (:meth:`WeightActivationMethod.plan_block`): fold what can be folded offline into
   the block's weights and norms (``folding.py``), and decide each linear's *online* input transforms
   (ops as data, ``core/transforms.py``). Each linear is then swapped for a :class:`TransformedLinear`
   that applies those ops and multiplies by the matching weight ``W T^-T``, so the block still
   computes exactly the original function (this is what the "transforms are invisible in float"
   tests check).
2. **Calibrate**, group by group in forward order (only when needed: static activation scales or
   GPTQ weights): run the block on the calibration inputs with the earlier groups already
   quantized, and record each linear's *transformed* input (range, or Hessian) (``capture.py``).
3. **Quantize**: weights by RTN (optionally clipped) or GPTQ, the input quantizer from the
   checkpoint's ``activations`` settings, and swap the linear for the module the method was built
   with (``quantized_linear``: the loader's own quantized linear, from the very tensors that will be
   written) -- so calibration propagates through exactly what ``from_pretrained`` will compute.

The LM head (``--include-lm-head``) gets the method's *weight* quantizer only (RTN with the method's
clip, or GPTQ on the head's inputs): no online transforms and no activation quantization, since the
loader's head reads the final norm's output as a plain (weight-quantized) linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.activations import ActivationSpec, RangeObserver
from ..core.configs import WeightActivationConfig, check_expert_options
from ..core.schemes import QuantizedWeight, compute_qparams, quantize_with_qparams
from ..core.transforms import apply_input_transforms, transform_weight
from ..families import LinearGroup
from .awq import search_clip
from .base import BlockCalibration, HeadBlock, QuantMethod, find_linear, qualified
from .capture import feed_inputs, require_inputs
from .experts import AllTokenInputs
from .gptq import HessianAccumulator, gptq_quantize
from .shared_inputs import BlockInputs, GroupInputStats, collect_block_inputs, feed_group

__all__ = ["BlockInputs", "GroupInputStats", "LinearPlan", "MoEWeightActivationConfig", "TransformedLinear",
           "WeightActivationMethod", "collect_block_inputs"]

WEIGHT_METHODS = ("rtn", "gptq")


def group_grams(gram: torch.Tensor, scheme) -> torch.Tensor:
    """The ``[groups, k, k]`` diagonal blocks of an input Gram matrix, one per weight group."""
    n_in = gram.shape[0]
    k = scheme.effective_group_size(n_in)
    n = n_in // k
    return gram.reshape(n, k, n, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class MoEWeightActivationConfig(WeightActivationConfig):
    """The weight-activation configs' base: how routed experts of mixture-of-experts layers are
    calibrated (as the weight-only methods' options; dense families ignore them). An expert the
    router sent fewer than ``min_expert_tokens`` calibration tokens falls back to the all-token
    statistics; there is no RTN fallback (activations are quantized per token at run time)."""

    expert_calibration: str = "all-tokens"  # or "routed": the tokens the router sent each expert
    min_expert_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expert_options(self)


@dataclass
class LinearPlan:
    """What step 1 decided for one linear: its online ops and the tensors they reference."""

    ops: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class TransformedLinear(nn.Module):
    """A float linear that applies online transforms to its input: ``F.linear(x T, W T^-T, b)``.

    Stands in for a block's linear between steps 1 and 3."""

    def __init__(self, linear: nn.Linear, plan: LinearPlan):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.ops = plan.ops
        self.tensors = plan.tensors
        self.weight = transform_weight(linear.weight.data, plan.ops, plan.tensors).to(
            device=linear.weight.device, dtype=linear.weight.dtype
        )
        self.bias = None if linear.bias is None else linear.bias.data

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x T``: what the matmul (and so the quantizer) sees."""
        if not self.ops:
            return x
        h = x if x.dtype == torch.float64 else x.float()
        return apply_input_transforms(h, self.ops, self.tensors).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transformed_input(x), self.weight, self.bias)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class WeightActivationMethod(QuantMethod):
    """Base of the weight-activation methods: subclasses override :meth:`plan_block` (and
    :meth:`prepare` for whole-model transforms)."""

    config_class: ClassVar[type[WeightActivationConfig]] = WeightActivationConfig
    needs_calibration: ClassVar[bool] = False  # refined per instance in __init__
    # Every routed and shared expert is quantized; folds at a norm reach all its readers, the router
    # included (shared_inputs.py).
    supports_experts: ClassVar[bool | None] = True

    def __init__(self, config: WeightActivationConfig, adapter, model_config, **kwargs):
        super().__init__(config, adapter, model_config, **kwargs)
        self.weight_method = getattr(config, "weight_method", "rtn")
        self.act_spec = ActivationSpec.from_config(config.activations())
        # An instance attribute: the pipeline asks the instance whether to capture calibration data.
        self.needs_calibration = self.method_needs_calibration()

    # ---- what subclasses change ------------------------------------------------------------------

    def method_needs_calibration(self) -> bool:
        return self.act_spec.static or self.needs_hessian()

    def needs_hessian(self) -> bool:
        """GPTQ weights, or RTN weights whose clipping is searched against the inputs (``w_clip``)."""
        return self.weight_method == "gptq" or bool(getattr(self.config, "w_clip", False))

    def plan_block(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, LinearPlan]:
        """Step 1: fold offline transforms into ``block`` (whose concrete groups, experts expanded,
        are ``groups``) and return each linear's online ops (absent: none)."""
        return {}

    def block_inputs(self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration,
                     sample_tokens: int = 0) -> BlockInputs:
        """Every group's input statistics (routed experts per ``expert_calibration``), recording
        the experts that fell back to the all-token statistics."""
        inputs = collect_block_inputs(block, groups, calib, self.config, sample_tokens)
        self._record_fallbacks(prefix, {group: why for group, why in inputs.fallbacks.items()})
        return inputs

    def _record_fallbacks(self, prefix: str, fallbacks: dict[LinearGroup, str]) -> None:
        for group, why in fallbacks.items():
            for name in group.linears:
                self.calibration_fallbacks[qualified(prefix, name)] = f"all-tokens: {why}"

    def weight_clip_ratio(self, full_name: str) -> float:
        return 1.0

    # ---- the shared steps ------------------------------------------------------------------------

    def transform_block(
        self, block: nn.Module, prefix: str, calib: BlockCalibration | None,
        groups: tuple[LinearGroup, ...] | None = None,
    ) -> dict[str, TransformedLinear]:
        """Step 1, applied: the block computes as before, through :class:`TransformedLinear` s.
        ``groups``: the block's concrete groups (default: as the adapter resolves them)."""
        groups = self.adapter.block_groups(block) if groups is None else groups
        plans = self.plan_block(block, prefix, groups, calib)
        modules = {}
        for name in (name for group in groups for name in group.linears):
            module = TransformedLinear(find_linear(block, name), plans.get(name, LinearPlan()))
            set_submodule(block, name, module)
            modules[name] = module
        return modules

    @torch.no_grad()
    def quantize_groups(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, QuantizedWeight]:
        if groups != self.adapter.block_groups(block):
            raise ValueError("weight-activation methods transform whole decoder blocks (plan_block)")
        modules = self.transform_block(block, prefix, calib, groups)
        # Valid for one pass in forward order: an expert's input is the output of a norm that only
        # the (already quantized) groups before it feed.
        every_token = AllTokenInputs(block, calib) if calib is not None else None
        results: dict[str, QuantizedWeight] = {}
        for group in groups:
            observed = self._observe_group(block, prefix, group, {n: modules[n] for n in group.linears}, calib,
                                           every_token)
            for name in group.linears:
                full_name = qualified(prefix, name)
                qweight = self._quantize_linear(full_name, modules[name], group, *observed.get(name, (None, None)))
                set_submodule(block, name, self.build_module(full_name, qweight, modules[name].weight.device))
                results[full_name] = qweight
        return results

    @torch.no_grad()
    def quantize_head(
        self, norm: nn.Module, head: nn.Linear, name: str, calib: BlockCalibration | None
    ) -> QuantizedWeight:
        """The method's weight quantizer on the head (GPTQ/clip search on its inputs when the method
        uses them); its input stays in float (module docstring)."""
        hessian = None
        if self.needs_hessian():
            if calib is None or len(calib) == 0:
                raise ValueError(f"{self.name} needs calibration inputs to quantize the LM head")
            block = HeadBlock(norm, head, name)
            hessian = HessianAccumulator(head.in_features, device=head.weight.device)
            require_inputs(feed_inputs(block, {name: head}, calib, lambda _, x: hessian.add_batch(x)))
        return self._quantize_weight(name, head.weight.data.float(), head.bias, hessian)

    def _observe_group(
        self, block: nn.Module, prefix: str, group: LinearGroup, modules: dict[str, TransformedLinear],
        calib: BlockCalibration | None, every_token: AllTokenInputs | None,
    ) -> dict[str, tuple[RangeObserver | None, Any]]:
        """Step 2: transformed-input ranges (static activations) and Hessians (GPTQ) of one group
        (a routed expert's from its routed tokens or from every token, ``shared_inputs.feed_group``)."""
        want_range, want_hessian = self.act_spec.static, self.needs_hessian()
        if not (want_range or want_hessian):
            return {}
        if calib is None or len(calib) == 0:
            raise ValueError(f"{self.name} needs calibration inputs for static activation scales or GPTQ")
        observed = {
            name: (
                RangeObserver() if want_range else None,
                HessianAccumulator(module.in_features, device=module.weight.device) if want_hessian else None,
            )
            for name, module in modules.items()
        }

        def consume(name: str, x: torch.Tensor) -> None:
            x = modules[name].transformed_input(x)
            rng, hes = observed[name]
            if rng is not None:
                rng.add(x)
            if hes is not None:
                hes.add_batch(x)

        assert every_token is not None
        reason = feed_group(block, group, modules, calib, self.config, every_token, consume)
        if reason is not None:
            self._record_fallbacks(prefix, {group: reason})
        return observed

    def _quantize_linear(
        self,
        full_name: str,
        module: TransformedLinear,
        group: LinearGroup,
        rng: RangeObserver | None,
        hessian: Any,
    ) -> QuantizedWeight:
        """Step 3 for one linear: weight codes of ``W T^-T``, then the online ops and their tensors."""
        qweight = self._quantize_weight(full_name, module.weight.float(), module.bias, hessian)
        qweight.input_transforms = [dict(op) for op in module.ops] + [{"op": "quantize_input"}]
        if self.config.qkv_bits and group.role == "qkv":
            qweight.input_transforms.append({"op": "quantize_output"})
        qweight.extra_tensors = {k: v.detach().cpu().contiguous() for k, v in module.tensors.items()}
        if rng is not None:
            qweight.extra_tensors.update(rng.tensors(self.act_spec))
        return qweight

    def _quantize_weight(
        self, full_name: str, weight: torch.Tensor, bias: torch.Tensor | None, hessian: Any
    ) -> QuantizedWeight:
        """The weight quantizer: GPTQ with the Hessian, or RTN with the method's clip (searched
        against the inputs with ``w_clip``)."""
        scheme = self.layer_scheme(full_name, weight.shape[1])
        if hessian is not None and self.weight_method == "gptq":
            cfg = self.config
            qweight = gptq_quantize(
                weight, hessian.H, scheme, damp=getattr(cfg, "damp", 0.01), mse_clip=getattr(cfg, "w_clip", False),
                scale_dtype=self.scale_dtype, bias=bias,
            )
        else:
            clip: float | torch.Tensor = self.weight_clip_ratio(full_name)
            if hessian is not None:  # w_clip: per (row, group) shrink with the least output error
                clip = search_clip(weight, group_grams(hessian.H, scheme), scheme, scale_dtype=self.scale_dtype)
            scale, zero = compute_qparams(weight, scheme, self.scale_dtype, clip_ratio=clip)
            codes = quantize_with_qparams(weight, scale, zero, scheme)
            zero_point = None if scheme.symmetric else zero.to(torch.uint8)
            qweight = QuantizedWeight(codes=codes, scale=scale, zero_point=zero_point, scheme=scheme, bias=bias)
        return qweight

    def build_module(self, full_name: str, qweight: QuantizedWeight, device: torch.device) -> nn.Module:
        """The module the block computes with after step 3, from the builder this method was built with."""
        if self.quantized_linear is None:
            raise RuntimeError(
                f"{self.name} leaves quantized linears in the block and was built without a quantized_linear "
                "builder (registry.build_method(..., quantized_linear=...); quantize/pipeline.py has one)"
            )
        return self.quantized_linear(full_name, qweight, self.config.activations(), device)
