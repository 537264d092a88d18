"""The native ``qdlm`` format: tensor names, dtypes and shapes of one quantized linear, the dtype
tables, the files the format adds, and each module's slice of ``quantization_config``. The written
spec is docs/FORMAT.md; this module is its code (the whole config: :mod:`.config_schema`; the report:
:mod:`.report`).

Per quantized linear ``NAME`` (tensor names follow compressed-tensors where they fit):

    NAME.weight_packed      int32   [out, ceil(in*bits/32)]   codes, packed by core/packing.py
    NAME.weight_scale       float*  [out, groups]             groups = in/group_size (1 per channel)
    NAME.weight_zero_point  uint8   [out, groups]             asymmetric only; unsigned zero codes
    NAME.weight_shape       int64   [2]                       (out, in)
    NAME.bias               float*  [out]                     only if the source linear has a bias

Weight-activation checkpoints add, per module, the tensors its online input transforms reference
(``transforms.modules[NAME]``: ``input_smooth``, ``input_rotation_*``, ``input_permutation``; see
``core/transforms.py``) and, for static activation quantization, ``input_scale`` (and
``input_zero_point``) (``core/activations.py``).

Fused experts (``quantization_config.fused_experts``, :func:`fused_projections`): a stacked
projection ``NAME`` of ``E`` experts stores the same weight tensors with a leading ``[E]``
(``weight_shape`` ``[E, 2]``); weight-only, no bias (:attr:`LinearSpec.experts`). A fused module whose
experts are weight-activation is stored unstacked (``"stacked": false``, :func:`unstacked_projections`):
one ordinary quantized linear per expert and part, ``MODULE.E.PART``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.activations import ActivationSpec
from ..errors import CheckpointError
from ..core.schemes import QuantizedWeight, WeightScheme
from ..core.transforms import transform_tensor_specs
from ..core.packing import pack_rows, packed_words

FORMAT_NAME = "qdlm"
FORMAT_VERSION = 1
# The files the format adds beside the weights and config.json (docs/FORMAT.md).
REPORT_FILE = "qdlm_report.json"  # sizes, error, calibration, tensor manifest, eval results
CARD_FILE = "README.md"  # the model card (hub/card.py renders it)
LOCAL_SOURCE_FILE = "qdlm_source.local"  # the absolute source path on this machine; never uploaded
# safetensors header dtype names of the torch dtypes a checkpoint may hold (writer, loader, inspect).
ST_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_DTYPES = {name: dtype for dtype, name in ST_DTYPE_NAMES.items()}  # safetensors name -> torch dtype
ST_FLOAT_DTYPES = {name: ST_DTYPES[name] for name in ("F32", "F16", "BF16", "F64")}  # what a source linear may hold
SUPPORTED_FORMAT_VERSIONS = (1,)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def checkpoint_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint loads in by default (config ``dtype``/``torch_dtype``; float32 if absent)."""
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LinearSpec:
    """Everything needed to allocate (and validate) one quantized linear's tensors."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype
    has_bias: bool = False
    bias_dtype: torch.dtype = torch.float32
    # Weight-activation checkpoints: the module's online ops (transforms.modules[NAME], a tuple of
    # dicts) and the checkpoint's activations section (None: inputs stay in floating point).
    input_transforms: tuple = ()
    activations: dict | None = None
    # > 0: a stacked projection of this many experts (fused experts): every weight tensor gains a
    # leading [experts] dimension; in/out features are one expert's.
    experts: int = 0

    @property
    def quantizes_input(self) -> bool:
        return any(op["op"] == "quantize_input" for op in self.input_transforms)

    @property
    def quantizes_output(self) -> bool:
        return any(op["op"] == "quantize_output" for op in self.input_transforms)

    @property
    def input_activation(self) -> ActivationSpec | None:
        """The quantizer of this module's (transformed) input, or None."""
        if not self.quantizes_input:
            return None
        if not self.activations:
            raise ValueError("a module quantizes its input but the checkpoint has no activations section")
        return ActivationSpec.from_config(self.activations)

    @property
    def output_activation(self) -> ActivationSpec | None:
        """The per-token quantizer of this module's output (q/k/v with ``qkv_bits``), or None."""
        if not self.quantizes_output:
            return None
        if not self.activations or not self.activations.get("qkv_bits"):
            raise ValueError("a module quantizes its output but the activations section has no qkv_bits")
        spec = ActivationSpec.from_config(self.activations, bits=int(self.activations["qkv_bits"]))
        return ActivationSpec(spec.bits, "token", spec.symmetric, spec.clip_ratio)

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, self.symmetric)

    @property
    def groups(self) -> int:
        return self.scheme.groups(self.in_features)

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Suffix -> (dtype, shape) of every tensor this linear stores (weights, transforms, activations)."""
        spec = self.weight_tensors()
        for suffix, value in self.transform_tensors().items():
            if suffix in spec:
                raise ValueError(f"transform tensor name {suffix!r} collides with a weight tensor")
            spec[suffix] = value
        return spec

    def transform_tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Suffix -> (dtype, shape) of the online-transform and static activation tensors."""
        spec = transform_tensor_specs(self.input_transforms, self.in_features)
        act = self.input_activation
        if act is not None:
            spec.update(act.tensor_specs())
        return spec

    def weight_tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Suffix -> (dtype, shape) of the quantized weight's own tensors (and the bias)."""
        lead = (self.experts,) if self.experts else ()
        spec = {
            "weight_packed": (torch.int32, (*lead, self.out_features, packed_words(self.in_features, self.bits))),
            "weight_scale": (self.scale_dtype, (*lead, self.out_features, self.groups)),
            "weight_shape": (torch.int64, (*lead, 2)),
        }
        if not self.symmetric:
            spec["weight_zero_point"] = (torch.uint8, (*lead, self.out_features, self.groups))
        if self.has_bias:
            spec["bias"] = (self.bias_dtype, (*lead, self.out_features))
        return spec

    @property
    def weight_count(self) -> int:
        """Weights this module quantizes (every expert's, for a stacked projection)."""
        return max(self.experts, 1) * self.out_features * self.in_features

    def stored_bytes(self) -> int:
        total = 0
        for dtype, shape in self.weight_tensors().values():  # transforms are not weight bytes
            n = 1
            for s in shape:
                n *= s
            total += n * torch.empty((), dtype=dtype).element_size()
        return total


def linear_tensors(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one quantized linear (suffixes, without the module name)."""
    out, inp = qweight.shape
    tensors = {
        "weight_packed": pack_rows(qweight.codes, qweight.scheme.bits),
        "weight_scale": qweight.scale.contiguous(),
        "weight_shape": torch.tensor([out, inp], dtype=torch.int64),
    }
    if qweight.zero_point is not None:
        tensors["weight_zero_point"] = qweight.zero_point.to(torch.uint8).contiguous()
    if qweight.bias is not None:
        tensors["bias"] = qweight.bias.detach().contiguous()
    for suffix, tensor in qweight.extra_tensors.items():  # transform tensors (rotations, smoothing)
        if suffix in tensors:
            raise ValueError(f"transform tensor name {suffix!r} collides with a weight tensor")
        tensors[suffix] = tensor.detach().contiguous()
    return tensors


def module_spec(qconfig: dict[str, Any], name: str, in_features: int, out_features: int, has_bias: bool,
                bias_dtype: torch.dtype = torch.float32, experts: int = 0) -> LinearSpec:
    """The spec of module ``name`` under a checkpoint's ``quantization_config`` (overrides applied);
    ``experts``: the expert count of a stacked projection (:func:`fused_projections`)."""
    weights = dict(qconfig["weights"])
    weights.update(qconfig.get("module_overrides", {}).get(name, {}))
    ops = ((qconfig.get("transforms") or {}).get("modules") or {}).get(name, [])
    spec = LinearSpec(
        in_features=in_features,
        out_features=out_features,
        bits=int(weights["bits"]),
        group_size=int(weights["group_size"]),
        symmetric=bool(weights["symmetric"]),
        scale_dtype=DTYPES[weights["scale_dtype"]],
        has_bias=has_bias,
        bias_dtype=bias_dtype,
        input_transforms=tuple(dict(op) for op in ops),
        activations=dict(qconfig["activations"]) if qconfig.get("activations") else None,
        experts=experts,
    )
    if experts and (has_bias or spec.input_transforms or spec.activations):
        raise CheckpointError(
            f"module {name}: a stacked experts projection is weight-only (no bias, transforms or activation "
            "quantization), but quantization_config gives it some",
            hint="the checkpoint was written by a newer qdlm-export or edited by hand",
        )
    try:
        spec.tensors()  # validates the transform ops against the layer's size
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"module {name}: invalid transforms/activations in quantization_config ({exc})",
            hint="the checkpoint was written by a newer qdlm-export or edited by hand",
        ) from None
    return spec


def module_config_entry(name: str, qweight: QuantizedWeight, *, activations: dict | None = None) -> dict[str, Any]:
    """The slice of ``quantization_config`` that describes module ``name``, from what a method produced:
    its scheme (overrides already applied), the scale dtype it stored, its online ops, the activations."""
    scheme = qweight.scheme
    return {
        "weights": {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric,
                    "scale_dtype": dtype_name(qweight.scale.dtype)},
        "module_overrides": {},
        "transforms": {"modules": {name: [dict(op) for op in qweight.input_transforms]}},
        "activations": dict(activations) if activations else None,
    }


def quantized_linear_spec(name: str, qweight: QuantizedWeight, *, activations: dict | None = None) -> LinearSpec:
    """The :class:`LinearSpec` of ``qweight`` as module ``name`` (what the loader's linear is built from)."""
    out, inp = qweight.shape
    bias = qweight.bias
    return module_spec(module_config_entry(name, qweight, activations=activations), name, inp, out,
                       bias is not None, bias.dtype if bias is not None else torch.float32)


# ---- fused experts and shared stacks (docs/FORMAT.md "Fused experts") --------------------------

FUSED_EXPERTS_KEY = "fused_experts"  # quantization_config: fused experts module -> its stacked projections
STACKED_KEY = "stacked"  # in a fused_experts entry: false when the experts are stored one linear each
SHARED_STACK_KEY = "shared_stack"  # quantization_config: {"alias": prefix, "stored": prefix}
FUSED_ROLES = ("gate_up", "down")  # an expert computes down(act(gate x) * up x)
_SECTION_HINT = "the checkpoint's config.json was edited by hand or damaged: create it again with `qdlm-export quantize`"


@dataclass(frozen=True)
class FusedProjection:
    """One stacked projection of a fused experts module, as ``quantization_config.fused_experts``
    describes it: ``module.attribute`` holds every expert's weight, ``[experts, sum(rows), in]``
    dequantized, the rows of each of ``parts`` in order (the gate's then the up's)."""

    module: str  # the fused experts module, as the checkpoint names it
    attribute: str  # the projection's attribute on it ("gate_up_proj")
    role: str  # "gate_up" or "down"
    experts: int
    parts: tuple[str, ...]  # the unfused view's linear names, in row order
    rows: tuple[int, ...]
    activation: str  # the module's activation attribute
    # False: stored unstacked (weight-activation experts), one quantized linear per expert and part
    stacked: bool = True

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}"

    @property
    def out_features(self) -> int:
        return sum(self.rows)

    def expert_linears(self) -> list[str]:
        """The unfused view's linears of this projection, expert by expert (``MODULE.0.gate_proj``,
        ``MODULE.0.up_proj``, ``MODULE.1.gate_proj`` ...): what an unstacked module lists."""
        return [f"{self.module}.{e}.{part}" for e in range(self.experts) for part in self.parts]


def _section_error(message: str) -> CheckpointError:
    return CheckpointError(f"quantization_config.{FUSED_EXPERTS_KEY}: {message}", hint=_SECTION_HINT)


def _all_projections(qconfig: dict[str, Any]) -> list[FusedProjection]:
    """Every projection of ``quantization_config.fused_experts``, checked field by field: a stacked one
    must be listed in ``quantized_modules`` under its own name, an unstacked one (``"stacked": false``)
    under each of its experts' linears (and not under its own name)."""
    section = qconfig.get(FUSED_EXPERTS_KEY) or {}
    if not isinstance(section, dict):
        raise _section_error("is not a JSON object")
    listed = set(qconfig.get("quantized_modules") or ())
    found: list[FusedProjection] = []
    for module, entry in section.items():
        experts = entry.get("num_experts") if isinstance(entry, dict) else None
        if type(experts) is not int or experts <= 0:
            raise _section_error(f"{module!r} has no positive integer num_experts")
        activation = entry.get("activation", "act_fn")
        stacked = entry.get(STACKED_KEY, True)
        if type(stacked) is not bool:
            raise _section_error(f"{module!r}.{STACKED_KEY} must be true or false")
        for role in FUSED_ROLES:
            proj = entry.get(role)
            ok = isinstance(proj, dict) and isinstance(proj.get("module"), str) and proj["module"]
            parts, rows = (proj.get("parts"), proj.get("rows")) if ok else (None, None)
            if not (ok and isinstance(parts, list) and isinstance(rows, list) and parts and len(parts) == len(rows)
                    and all(isinstance(p, str) for p in parts)
                    and all(type(r) is int and r > 0 for r in rows)) or not isinstance(activation, str):
                raise _section_error(f"{module!r}.{role} must be {{\"module\": str, \"parts\": [str, ...], "
                                     "\"rows\": [int, ...]}} with one row count per part")
            fp = FusedProjection(module, proj["module"], role, experts, tuple(parts), tuple(rows), activation, stacked)
            if stacked and fp.name not in listed:
                raise _section_error(f"{fp.name} is not listed in quantized_modules")
            if not stacked:
                missing = [n for n in fp.expert_linears() if n not in listed]
                if missing or fp.name in listed:
                    raise _section_error(
                        f"{module!r} is stored unstacked, so quantized_modules must list "
                        + (f"its experts' linears ({missing[0]} is missing)" if missing else
                           f"its experts' linears, not the stacked {fp.name}"))
            found.append(fp)
        if len(entry["gate_up"]["parts"]) != 2 or len(entry["down"]["parts"]) != 1:
            raise _section_error(f"{module!r}: gate_up must have two parts (gate, up) and down one")
    return found


def fused_projections(qconfig: dict[str, Any]) -> dict[str, FusedProjection]:
    """Stacked module name -> :class:`FusedProjection` for every *stacked* projection of the
    checkpoint's fused experts modules (none: empty). The whole section is checked field by field."""
    return {fp.name: fp for fp in _all_projections(qconfig) if fp.stacked}


def unstacked_projections(qconfig: dict[str, Any]) -> dict[str, FusedProjection]:
    """Like :func:`fused_projections`, for the fused experts modules stored unstacked (``"stacked":
    false``: weight-activation experts, one quantized linear per expert and part)."""
    return {fp.name: fp for fp in _all_projections(qconfig) if not fp.stacked}


def shared_stack_prefixes(qconfig: dict[str, Any]) -> tuple[str, str] | None:
    """``(alias prefix, stored prefix)`` of ``quantization_config.shared_stack``: a module named under the
    alias prefix is the stored module of the same name under the stored prefix (None: no shared stack)."""
    section = qconfig.get(SHARED_STACK_KEY)
    if section is None:
        return None
    alias, stored = (section.get("alias"), section.get("stored")) if isinstance(section, dict) else (None, None)
    if not (isinstance(alias, str) and isinstance(stored, str) and alias and stored and alias != stored):
        raise CheckpointError(f"quantization_config.{SHARED_STACK_KEY} must be {{\"alias\": prefix, \"stored\": prefix}}",
                              hint=_SECTION_HINT)
    return alias, stored
