"""Weight-activation quantization: the shared machinery and its plain baseline, ``rtn-wa``.

Every weight-activation method here (``rtn-wa``, ``smoothquant``, ``quarot``, ``duquant``) runs the
same three steps per decoder block; they differ only in step 1:

1. **Transform** (:meth:`WeightActivationMethod.plan_block`): fold what can be folded offline into
   the block's weights and norms, and decide each linear's *online* input transforms (ops as data,
   ``qdlm_export/transforms.py``). Each linear is then swapped for a :class:`TransformedLinear`
   that applies those ops and multiplies by the matching weight ``W T^-T``, so the block still
   computes exactly the original function (this is what the "transforms are invisible in float"
   tests check).
2. **Calibrate**, group by group in forward order (only when needed: static activation scales or
   GPTQ weights): run the block on the calibration inputs with the earlier groups already
   quantized, and record each linear's *transformed* input (range, or Hessian).
3. **Quantize**: weights by RTN (optionally clipped) or GPTQ, the input quantizer from the
   checkpoint's ``activations`` settings, and swap the linear for the loader's own ``QdlmLinear``
   built from the very tensors that will be written -- so calibration propagates through exactly
   what ``from_pretrained`` will compute.

``rtn-wa`` is step 1 doing nothing: RTN weights plus the activation quantizer. It is the baseline
SmoothQuant/QuaRot/DuQuant are measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.activations import ActivationSpec, RangeObserver
from ..core.configs import WeightActivationConfig
from ..families import LinearGroup
from ..format.spec import dtype_name, linear_tensors, module_spec
from ..core.schemes import QuantizedWeight, compute_qparams, quantize_with_qparams
from ..core.transforms import apply_input_transforms, transform_weight
from .base import BlockCalibration, QuantMethod, find_linear
from .registry import register_method

from .awq import search_clip  # noqa: E402

try:  # GPTQ is optional here: QuaRot uses it for its weights when present.
    from .gptq import HessianAccumulator, gptq_quantize
except ImportError:  # pragma: no cover - depends on the checkout
    HessianAccumulator = gptq_quantize = None  # type: ignore[assignment]

WEIGHT_METHODS = ("rtn", "gptq")


def group_grams(gram: torch.Tensor, scheme) -> torch.Tensor:
    """The ``[groups, k, k]`` diagonal blocks of an input Gram matrix, one per weight group."""
    n_in = gram.shape[0]
    k = scheme.effective_group_size(n_in)
    n = n_in // k
    return gram.reshape(n, k, n, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class RTNWAConfig(WeightActivationConfig):
    """RTN weights + the activation quantizer, no transforms: the W8A8/W4A4 baseline."""

    method: ClassVar[str] = "rtn-wa"

    bits: int = 8
    group_size: int = -1  # per output channel, as every W/A method of the study


@dataclass
class LinearPlan:
    """What step 1 decided for one linear: its online ops and the tensors they reference."""

    ops: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class TransformedLinear(nn.Module):
    """A float linear that applies online transforms to its input: ``F.linear(x T, W T^-T, b)``.

    Stands in for a block's linear between steps 1 and 3; ``observers`` see the transformed input.
    """

    def __init__(self, linear: nn.Linear, plan: LinearPlan):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.ops = plan.ops
        self.tensors = plan.tensors
        self.weight = transform_weight(linear.weight.data, plan.ops, plan.tensors).to(
            device=linear.weight.device, dtype=linear.weight.dtype
        )
        self.bias = None if linear.bias is None else linear.bias.data
        self.observers: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops:
            h = x if x.dtype == torch.float64 else x.float()
            x = apply_input_transforms(h, self.ops, self.tensors).to(x.dtype)
        for observe in self.observers:
            observe(x)
        return F.linear(x, self.weight, self.bias)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class WeightActivationMethod(QuantMethod):
    """Base of the weight-activation methods: subclasses override :meth:`plan_block` (and
    :meth:`prepare` for whole-model transforms)."""

    config_class: ClassVar[type[WeightActivationConfig]] = WeightActivationConfig
    needs_calibration: ClassVar[bool] = False  # refined per instance in __init__

    def __init__(self, config: WeightActivationConfig, adapter, model_config):
        super().__init__(config, adapter, model_config)
        self.weight_method = getattr(config, "weight_method", "rtn")
        if self.weight_method == "gptq" and gptq_quantize is None:
            from ..errors import ConfigError

            raise ConfigError("weight_method gptq needs qdlm_export.methods.gptq, which is not available")
        self.act_spec = ActivationSpec.from_config(config.activations())
        # An instance attribute: the pipeline asks the instance whether to capture calibration data.
        self.needs_calibration = self.method_needs_calibration()

    # ---- what subclasses change ------------------------------------------------------------------

    def method_needs_calibration(self) -> bool:
        return self.act_spec.static or self.needs_hessian()

    def needs_hessian(self) -> bool:
        """GPTQ weights, or RTN weights whose clipping is searched against the inputs (``w_clip``)."""
        return self.weight_method == "gptq" or bool(getattr(self.config, "w_clip", False))

    def plan_block(self, block: nn.Module, prefix: str, calib: BlockCalibration | None) -> dict[str, LinearPlan]:
        """Step 1: fold offline transforms into ``block`` and return each linear's online ops."""
        return {name: LinearPlan() for name in self.adapter.linear_names}

    def weight_clip_ratio(self, full_name: str) -> float:
        return 1.0

    # ---- the shared steps ------------------------------------------------------------------------

    def transform_block(
        self, block: nn.Module, prefix: str, calib: BlockCalibration | None
    ) -> dict[str, TransformedLinear]:
        """Step 1, applied: the block computes as before, through :class:`TransformedLinear` s."""
        plans = self.plan_block(block, prefix, calib)
        modules = {}
        for name in self.adapter.linear_names:
            module = TransformedLinear(find_linear(block, name), plans[name])
            set_submodule(block, name, module)
            modules[name] = module
        return modules

    @torch.no_grad()
    def quantize_block(
        self, block: nn.Module, prefix: str, calib: BlockCalibration | None
    ) -> dict[str, QuantizedWeight]:
        modules = self.transform_block(block, prefix, calib)
        results: dict[str, QuantizedWeight] = {}
        for group in self.adapter.groups:
            observed = self._observe_group(block, {n: modules[n] for n in group.linears}, calib)
            for name in group.linears:
                full_name = f"{prefix}.{name}"
                qweight = self._quantize_linear(full_name, modules[name], group, *observed.get(name, (None, None)))
                set_submodule(block, name, self.build_module(full_name, qweight, modules[name].weight.device))
                results[full_name] = qweight
        return results

    def _observe_group(
        self, block: nn.Module, modules: dict[str, TransformedLinear], calib: BlockCalibration | None
    ) -> dict[str, tuple[RangeObserver | None, Any]]:
        """Step 2: transformed-input ranges (static activations) and Hessians (GPTQ) of one group."""
        want_range, want_hessian = self.act_spec.static, self.needs_hessian()
        if not (want_range or want_hessian):
            return {}
        if calib is None or len(calib) == 0:
            raise ValueError(f"{self.name} needs calibration inputs for static activation scales or GPTQ")
        observed = {}
        for name, module in modules.items():
            rng = RangeObserver() if want_range else None
            hes = HessianAccumulator(module.in_features, device=module.weight.device) if want_hessian else None
            if rng is not None:
                module.observers.append(rng.add)
            if hes is not None:
                module.observers.append(hes.add_batch)
            observed[name] = (rng, hes)
        try:
            calib.run(block)
        finally:
            for module in modules.values():
                module.observers.clear()
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
        scheme = self.layer_scheme(full_name, module.in_features)
        weight = module.weight.float()
        bias = module.bias
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
        qweight.input_transforms = [dict(op) for op in module.ops] + [{"op": "quantize_input"}]
        if self.config.qkv_bits and group.role == "qkv":
            qweight.input_transforms.append({"op": "quantize_output"})
        qweight.extra_tensors = {k: v.detach().cpu().contiguous() for k, v in module.tensors.items()}
        if rng is not None:
            qweight.extra_tensors.update(rng.tensors(self.act_spec))
        return qweight

    def qconfig_for(self, full_name: str, qweight: QuantizedWeight) -> dict[str, Any]:
        """The slice of the checkpoint's quantization_config that describes ``full_name``."""
        return {
            "weights": {
                "bits": self.config.bits,
                "group_size": self.config.group_size,
                "symmetric": self.config.symmetric,
                "scale_dtype": dtype_name(self.scale_dtype),
            },
            "module_overrides": {full_name: self.overrides[full_name]} if full_name in self.overrides else {},
            "transforms": {"modules": {full_name: qweight.input_transforms}},
            "activations": self.config.activations(),
        }

    def build_module(self, full_name: str, qweight: QuantizedWeight, device: torch.device) -> nn.Module:
        """The loader's ``QdlmLinear`` for ``qweight``, filled with the tensors that will be written."""
        from ..loader.hf_quantizer import QdlmLinear  # the loader imports transformers; keep it out of import time

        out, inp = qweight.shape
        bias = qweight.bias
        spec = module_spec(
            self.qconfig_for(full_name, qweight), full_name, inp, out, bias is not None,
            bias.dtype if bias is not None else torch.float32,
        )
        module = QdlmLinear(spec, device=device)
        tensors = linear_tensors(qweight)
        expected = set(spec.tensors())
        if set(tensors) != expected:
            raise RuntimeError(f"{full_name}: tensors {sorted(tensors)} do not match the format's {sorted(expected)}")
        for suffix, value in tensors.items():
            getattr(module, suffix).copy_(value)
        return module


# ---- helpers the methods share ------------------------------------------------------------------


class GroupInputStats:
    """Per-channel ``max|x|`` of a group's input and (optionally) a bounded sample of its tokens."""

    def __init__(self, sample_tokens: int = 0, batches: int = 1):
        self.absmax: torch.Tensor | None = None
        self.rows_per_batch = math.ceil(sample_tokens / max(batches, 1)) if sample_tokens else 0
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.abs().amax(0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if self.rows_per_batch:
            step = max(1, x.shape[0] // self.rows_per_batch)
            self.samples.append(x[::step][: self.rows_per_batch].cpu())

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.samples)


@torch.no_grad()
def collect_group_inputs(
    block: nn.Module, groups: tuple[LinearGroup, ...], calib: BlockCalibration, sample_tokens: int = 0
) -> dict[LinearGroup, GroupInputStats]:
    """Run ``block`` on the calibration inputs and record every group's input statistics."""
    stats = {group: GroupInputStats(sample_tokens, len(calib)) for group in groups}
    handles = []
    for group in groups:
        first = block.get_submodule(group.linears[0])
        handles.append(first.register_forward_pre_hook(lambda m, args, s=stats[group]: s.add(args[0])))
    try:
        calib.run(block)
    finally:
        for handle in handles:
            handle.remove()
    missing = [g.linears[0] for g, s in stats.items() if s.absmax is None]
    if missing:
        raise RuntimeError(f"linear(s) {', '.join(missing)} saw no input while the block ran on the calibration data")
    return stats


@register_method
class RTNWA(WeightActivationMethod):
    """RTN weights + activation quantization, nothing else (``rtn-wa``)."""

    name = "rtn-wa"
    config_class = RTNWAConfig
