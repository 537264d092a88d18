"""Loading ``qdlm`` checkpoints with ``from_pretrained``.

``import qdlm_export`` registers :class:`QdlmConfig` and :class:`QdlmHfQuantizer` with transformers
under ``quant_method: "qdlm"``. Before the weights load, the quantizer replaces every linear that
the checkpoint lists in ``quantized_modules`` by a :class:`QdlmLinear` whose buffers carry the
checkpoint's tensor names, so the packed tensors load straight into them: memory is the packed
size. The quantizer never infers anything: it reads the module list, the schemes and the
transforms from the config.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .activations import INPUT_SCALE, INPUT_ZERO_POINT, quantize_activation
from .errors import CheckpointError
from .formats.native import FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, LinearSpec, module_spec
from .kernels import packed_int_linear, quantize_per_token, weight_only_linear
from .transforms import apply_input_transforms, transform_ops


def uses_integer_input(spec: LinearSpec) -> bool:
    """Whether the loader runs this linear on the integer kernels: dynamic symmetric per-token inputs
    (int8 codes times the packed weight, int32 accumulation) compute what fake quantization computes,
    without dequantizing the input. Static or asymmetric inputs are fake-quantized, then dequant-GEMM."""
    act = spec.input_activation
    return act is not None and not act.static and act.symmetric and act.bits in (4, 8)


class QdlmLinear(nn.Module):
    """A linear layer holding packed integer weights; computes through ``kernels`` dispatch.

    Weight-activation checkpoints add, in this order: the module's online input transforms
    (``transforms.py``), quantization of the transformed input (``activations.py``), the matmul,
    and for q/k/v with ``qkv_bits`` a per-token quantization of the output.
    """

    def __init__(self, spec: LinearSpec, device: torch.device | str | None = None):
        super().__init__()
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        for suffix, (dtype, shape) in spec.tensors().items():
            self.register_buffer(suffix, torch.empty(shape, dtype=dtype, device=device))
        if not spec.has_bias:
            self.bias = None
        self._ops = transform_ops(spec.input_transforms)
        self._transform_names = tuple(spec.transform_tensors())
        self._act_in = spec.input_activation
        self._act_out = spec.output_activation
        self._integer_input = uses_integer_input(spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearSpec) -> "QdlmLinear":
        return cls(spec, device=linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if self._integer_input:
            h = self._transformed(x)
            x_q, x_scale = quantize_per_token(h, self._act_in.bits, self._act_in.clip_ratio)
            y = packed_int_linear(
                x_q, x_scale, self.weight_packed, self.weight_scale, getattr(self, "weight_zero_point", None),
                s.bits, s.group_size, s.in_features, self.bias, x.dtype,
            )
        else:
            y = self._dequantized_forward(x)
        if self._act_out is not None:
            y = quantize_activation(y, self._act_out).to(y.dtype)
        return y

    def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if self._ops or self._act_in is not None:
            x = self._prepare_input(x)
        return weight_only_linear(
            x,
            self.weight_packed,
            self.weight_scale,
            getattr(self, "weight_zero_point", None),
            s.bits,
            s.group_size,
            s.in_features,
            self.bias,
        )

    def _transformed(self, x: torch.Tensor) -> torch.Tensor:
        """The online input transforms, computed in float32 (float64 inputs stay float64)."""
        h = x if x.dtype == torch.float64 else x.float()
        if self._ops:
            tensors = {name: getattr(self, name) for name in self._transform_names}
            h = apply_input_transforms(h, self._ops, tensors)
        return h

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Transforms, then activation fake-quantization (static or asymmetric activations)."""
        h = self._transformed(x)
        if self._act_in is not None:
            h = quantize_activation(
                h, self._act_in, getattr(self, INPUT_SCALE, None), getattr(self, INPUT_ZERO_POINT, None)
            )
        return h.to(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        text = (
            f"in_features={s.in_features}, out_features={s.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, symmetric={s.symmetric}, bias={s.has_bias}"
        )
        if self._ops:
            text += ", transforms=" + "+".join(op["op"] for op in self._ops)
        if self._act_in is not None:
            text += f", act_bits={self._act_in.bits}, act={self._act_in.granularity}"
        return text


class QdlmConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qdlm checkpoint, kept verbatim (docs/FORMAT.md)."""

    def __init__(self, quant_method: str = FORMAT_NAME, format_version: int = 1, **kwargs: Any):
        self.quant_method = quant_method
        self.format_version = format_version
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def replace_quantized_linears(model: nn.Module, qconfig: dict[str, Any]) -> list[str]:
    """Swap each listed ``nn.Linear`` for a :class:`QdlmLinear` of the checkpoint's shape; returns names."""
    version = qconfig.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"qdlm format version {version!r} is not supported by this qdlm-export "
            f"(supports {SUPPORTED_FORMAT_VERSIONS})",
            hint="upgrade qdlm-export: pip install -U qdlm-export",
        )
    replaced = []
    for name in qconfig["quantized_modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"quantization_config lists module {name!r}, which this model does not have",
                hint="the checkpoint's config.json does not match its modeling code",
            ) from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"module {name!r} is a {type(linear).__name__}, not a Linear")
        bias_dtype = linear.bias.dtype if linear.bias is not None else torch.float32
        spec = module_spec(qconfig, name, linear.in_features, linear.out_features, linear.bias is not None, bias_dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QdlmLinear.from_linear(linear, spec))
        replaced.append(name)
    return replaced


class QdlmHfQuantizer(HfQuantizer):
    """transformers' hook into loading: module replacement before weights, nothing after."""

    requires_calibration = True  # a qdlm checkpoint is made by `qdlm-export quantize`, never on the fly

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_quantized_linears(model, self.quantization_config.to_dict())

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_with_transformers() -> None:
    """Register the config and quantizer under ``qdlm``; safe to call any number of times."""
    if FORMAT_NAME not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(FORMAT_NAME)(QdlmConfig)
    if FORMAT_NAME not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(FORMAT_NAME)(QdlmHfQuantizer)
