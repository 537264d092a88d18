"""Loading ``qdlm`` checkpoints with ``from_pretrained``.

``import qdlm_export`` registers :class:`QdlmConfig` and :class:`QdlmHfQuantizer` with transformers
under ``quant_method: "qdlm"``. Before the weights load, the quantizer replaces every linear that
the checkpoint lists in ``quantized_modules`` by a :class:`QdlmLinear` whose buffers carry the
checkpoint's tensor names, so the packed tensors load straight into them: memory is the packed
size. The quantizer never infers anything: it reads the module list, the schemes and the
transforms from the config.

Loading is strict: before any weight is read, the quantizer reads the safetensors headers of the
checkpoint's files and refuses (a :class:`CheckpointError` naming the tensor and its file) a
checkpoint where a tensor the config promises is missing or has the wrong dtype or shape, or whose
file is truncated; after loading it checks again that every quantized module's buffers were really
loaded. A quantized module never computes on uninitialised memory. The checks use the standard
library only (``format/tensor_headers.py``), so the self-contained copy (``loader/selfcontained.py``) carries them.

Fused experts (``quantization_config.fused_experts``) become :class:`~.fused_experts.QdlmFusedExperts`
over stacked packed tensors, or, stored unstacked (weight-activation experts), a
:class:`~.fused_experts.QdlmUnstackedExperts` whose per-expert linears are ``QdlmLinear`` s; a shared
layer stack (``quantization_config.shared_stack``: DiffusionGemma's encoder) gets the stored quantized
modules themselves (``shared_stack.py``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.activations import INPUT_SCALE, INPUT_ZERO_POINT, quantize_activation
from ..errors import CheckpointError
from ..format.config_schema import check_format_version
from ..format.spec import FORMAT_NAME, LinearSpec, module_spec
from ..format.tensor_headers import damaged, check_module_tensors, read_safetensors_headers
from ..kernels import packed_int_linear, quantize_per_token, weight_only_linear
# the module, not the package: the self-contained copy carries it (the package is a shim there)
from ..kernels.weight_only import dequantize_packed
from ..core.transforms import apply_input_transforms, transform_ops
from .fused_experts import (
    QdlmFusedExperts,
    QdlmStackedLinear,
    fused_modules,
    replace_fused_experts,
    replace_unstacked_experts,
    stacked_names,
    unstacked_linear_names,
    unstacked_modules,
)
from .shared_stack import bind_aliases, detach_aliases, prune_tied_keys


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
            # the quantizers compute in float32 themselves: without transforms, no float32 copy of x
            # (and bf16 rows reach the native bf16 quantizer on the CPU)
            h = self._transformed(x) if self._ops else x
            x_q, x_scale = quantize_per_token(h, self._act_in.bits, self._act_in.clip_ratio)
            y = packed_int_linear(
                x_q, x_scale, self.weight_packed, self.weight_scale, self._buffers.get("weight_zero_point"),
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
            self._buffers.get("weight_zero_point"),  # a buffer when asymmetric (getattr's miss raises: ~1 us a call)
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


def checkpoint_prefix(model: nn.Module, names: Iterable[str]) -> str:
    """The prefix that ``names`` (checkpoint names, as ``quantized_modules`` lists them) carry beyond
    ``model``'s own module names: ``""`` normally; the model's ``base_model_prefix`` (``"model"``) when
    ``model`` is the base model itself (``AutoModel`` of a dense causal LM: ``Qwen2Model``, which has no
    ``model`` attribute) and every name starts with ``prefix + "."``. transformers maps checkpoint keys
    to such a model by stripping that prefix; the loader maps names the same way."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = list(names)
    if not prefix or not names or not all(n.startswith(prefix + ".") for n in names):
        return ""
    try:
        model.get_submodule(prefix)
    except AttributeError:
        return prefix  # the model is the base model: the prefix names no module of it
    return ""  # the model holds its base model under the prefix: names are paths in it as they are


def _local_name(name: str, prefix: str) -> str:
    """A checkpoint module name as a path in the model (see :func:`checkpoint_prefix`)."""
    return name[len(prefix) + 1:] if prefix else name


def _checkpoint_name(name: str, prefix: str) -> str:
    """A module name of the model as the checkpoint spells it (see :func:`checkpoint_prefix`)."""
    return f"{prefix}.{name}" if prefix else name


def replace_quantized_linears(model: nn.Module, qconfig: dict[str, Any]) -> list[str]:
    """Swap each listed ``nn.Linear`` for a :class:`QdlmLinear` of the checkpoint's shape; returns the
    names as listed (the checkpoint's). A base model loaded from a full model's checkpoint (``AutoModel``
    of a dense causal LM) has its modules under the names without the ``base_model_prefix``
    (:func:`checkpoint_prefix`)."""
    check_format_version(qconfig)
    replaced = []
    prefix = checkpoint_prefix(model, qconfig["quantized_modules"])
    stacked = stacked_names(qconfig)  # fused experts' projections: replace_fused_experts
    for name in qconfig["quantized_modules"]:
        if name in stacked:
            continue
        local = _local_name(name, prefix)
        try:
            linear = model.get_submodule(local)
        except AttributeError:
            raise CheckpointError(
                f"quantization_config lists module {name!r}, which this model does not have",
                hint="the checkpoint's config.json does not match its modeling code",
            ) from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(
                f"module {name!r} is a {type(linear).__name__}, not a Linear",
                hint="the checkpoint's config.json does not match its modeling code",
            )
        bias_dtype = linear.bias.dtype if linear.bias is not None else torch.float32
        spec = module_spec(qconfig, name, linear.in_features, linear.out_features, linear.bias is not None, bias_dtype)
        parent_name, _, child = local.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QdlmLinear.from_linear(linear, spec))
        replaced.append(name)
    return replaced


def quantized_modules(model: nn.Module) -> list[tuple[str, QdlmLinear | QdlmStackedLinear]]:
    """Every module holding a checkpoint's packed tensors: quantized linears and stacked expert projections."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QdlmLinear, QdlmStackedLinear))]


def check_checkpoint_files(model: nn.Module, checkpoint_files: Iterable[str | os.PathLike], prefix: str = "") -> None:
    """Before loading: the files' headers hold every tensor of every :class:`QdlmLinear` in ``model``
    (under ``prefix.`` when ``model`` is the base model of the checkpoint's model: :func:`checkpoint_prefix`)."""
    files = [os.fspath(f) for f in checkpoint_files]
    entries = read_safetensors_headers(files)
    names = [os.path.basename(f) for f in files]
    where = ", ".join(names) if len(names) <= 3 else f"the {len(names)} weight files"
    for name, module in quantized_modules(model):
        check_module_tensors(_checkpoint_name(name, prefix), module.spec, entries, where)


def check_loaded_modules(model: nn.Module, headers_checked: bool, prefix: str = "") -> None:
    """After loading: every buffer of every :class:`QdlmLinear` holds loaded data of the promised shape.

    transformers fills a tensor absent from the checkpoint with uninitialised memory (and only logs
    "MISSING"); a loaded tensor carries its ``_is_hf_initialized`` flag. When the files' headers were
    checked first this cannot happen; otherwise (a ``state_dict`` passed in) the flag decides."""
    for name, module in quantized_modules(model):
        for suffix, (dtype, shape) in module.spec.tensors().items():
            key = f"{_checkpoint_name(name, prefix)}.{suffix}"
            tensor = getattr(module, suffix, None)
            if tensor is None:
                raise damaged(f"tensor {key} was not loaded: it is missing from the checkpoint")
            if not headers_checked and (tensor.is_meta or not getattr(tensor, "_is_hf_initialized", False)):
                raise damaged(f"tensor {key} was not loaded: it is missing from the checkpoint")
            if tuple(tensor.shape) != tuple(shape):
                raise damaged(f"tensor {key} was loaded with shape {list(tensor.shape)}, expected {list(shape)}")
            if not dtype.is_floating_point and tensor.dtype != dtype:
                raise damaged(f"tensor {key} was loaded as {tensor.dtype}, expected {dtype}")


def check_all_tensors_loaded(model: nn.Module, prefix: str = "") -> None:
    """After loading: every parameter and persistent buffer of ``model`` came from the checkpoint.

    A qdlm checkpoint carries all of its model's tensors. transformers fills one that is absent (an
    embedding, a norm, the LM head) with freshly initialised values and only logs "MISSING", which
    would compute with random weights: refused, naming the tensor. Tied weights (filled from their
    source) and the model's ``_keys_to_ignore_on_load_missing`` are exempt; an offloaded tensor (on
    ``meta``) is not judged."""
    import re

    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or ()
    ignore = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
    missing = [
        key for key, tensor in model.state_dict(keep_vars=True).items()
        if key not in tied and not (ignore is not None and ignore.search(key))
        and not tensor.is_meta and not getattr(tensor, "_is_hf_initialized", False)
    ]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise damaged(
            f"tensor {_checkpoint_name(missing[0], prefix)}{more} was not loaded: it is missing from the checkpoint, "
            "and transformers would fill it with random values"
        )


# Work other loader modules do on a model once its weights are loaded and checked, each called as
# ``hook(model, quantization_config dict, checkpoint prefix)``: ``loader/grouped_experts.py`` adds the
# grouped mixture-of-experts path (registered when ``qdlm_export`` is imported). A self-contained
# checkpoint's copy of this module has none, so it computes with the published per-expert loop.
AFTER_LOAD_HOOKS: list[Callable[[nn.Module, dict[str, Any], str], None]] = []


def add_after_load_hook(hook: Callable[[nn.Module, dict[str, Any], str], None]) -> None:
    """Run ``hook`` on every model this quantizer loads (once per hook, in the order added)."""
    if hook not in AFTER_LOAD_HOOKS:
        AFTER_LOAD_HOOKS.append(hook)


class QdlmHfQuantizer(HfQuantizer):
    """transformers' hook into loading: module replacement and the tensor check before weights, and
    the check that every quantized buffer was loaded after."""

    requires_calibration = True  # a qdlm checkpoint is made by `qdlm-export quantize`, never on the fly

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qconfig = self.quantization_config.to_dict()
        # AutoModel of a dense causal LM builds the base model: names lose the base_model_prefix
        self._prefix = prefix = checkpoint_prefix(model, qconfig.get("quantized_modules") or [])
        # a fused experts module is shared by the stacks as a whole, stacked or not
        inside_fused = stacked_names(qconfig) | unstacked_linear_names(qconfig)
        shared = [n for n in qconfig.get("quantized_modules") or [] if n not in inside_fused]
        shared += [*fused_modules(qconfig), *unstacked_modules(qconfig)]
        self._aliases = detach_aliases(model, qconfig, shared, lambda name: _local_name(name, prefix))
        replace_fused_experts(model, qconfig, lambda name: _local_name(name, prefix))
        # per-expert placeholder linears, which replace_quantized_linears then swaps like any listed linear
        replace_unstacked_experts(model, qconfig, lambda name: _local_name(name, prefix))
        replace_quantized_linears(model, qconfig)
        prune_tied_keys(model)  # ties of the replaced modules' weights would name tensors that no longer exist
        files = [f for f in (checkpoint_files or []) if f is not None]
        self._headers_checked = bool(files) and all(str(f).endswith(".safetensors") for f in files)
        if self._headers_checked:
            check_checkpoint_files(model, files, self._prefix)

    def _process_model_after_weight_loading(self, model, **kwargs):
        prefix = getattr(self, "_prefix", "")
        check_loaded_modules(model, getattr(self, "_headers_checked", False), prefix)
        check_all_tensors_loaded(model, prefix)
        bind_aliases(model, getattr(self, "_aliases", []))  # the shared stack computes with the stored modules
        qconfig = self.quantization_config.to_dict()
        for hook in AFTER_LOAD_HOOKS:
            hook(model, qconfig, prefix)
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: each :class:`QdlmLinear` becomes an ``nn.Linear`` holding its
        dequantized weight ``(q - z) * s`` in ``dtype`` (the model's), each fused experts module its
        original module with the dequantized 3-D weights; a module shared by two stacks stays shared.
        Weight-only checkpoints only: a module with online input transforms or activation quantizers
        computes something no plain Linear does, so such a model is refused before anything is replaced."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        for name, module in quantized_modules(model):
            if isinstance(module, QdlmLinear) and (module._ops or module._act_in is not None
                                                    or module._act_out is not None):
                raise CheckpointError(
                    f"cannot dequantize module {name!r}: it applies online input transforms or activation "
                    "quantization, which a plain Linear cannot hold",
                    hint="dequantize() supports weight-only qdlm checkpoints; load the original model instead",
                )
            if any(t.is_meta for t in module.buffers()):
                raise CheckpointError(f"cannot dequantize module {name!r}: its weights are offloaded (on meta)",
                                      hint="load the model without disk/CPU offload to dequantize it")
        dense: dict[int, nn.Module] = {}  # id of a quantized module -> its replacement, shared like it
        for name, module in list(model.named_modules(remove_duplicate=False)):
            if not isinstance(module, (QdlmFusedExperts, QdlmLinear)):
                continue
            if id(module) not in dense:
                if isinstance(module, QdlmFusedExperts):
                    scale = getattr(module, module.gate_up_name).weight_scale
                    dense[id(module)] = module.dequantized_module(dtype or scale.dtype)
                else:
                    dense[id(module)] = _dense_linear(module, dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dense[id(module)])
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _dense_linear(module: QdlmLinear, dtype: torch.dtype | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``module``'s dequantized weight (and bias) in ``dtype``."""
    s = module.spec
    weight = dequantize_packed(module.weight_packed, module.weight_scale, getattr(module, "weight_zero_point", None),
                               s.bits, s.group_size, s.in_features, dtype or module.weight_scale.dtype)
    linear = nn.Linear(s.in_features, s.out_features, bias=module.bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def register_with_transformers() -> None:
    """Register the config and quantizer under ``qdlm``; safe to call any number of times."""
    if FORMAT_NAME not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(FORMAT_NAME)(QdlmConfig)
    if FORMAT_NAME not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(FORMAT_NAME)(QdlmHfQuantizer)
