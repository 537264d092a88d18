"""The ``quantization_config`` schema (docs/FORMAT.md): the one builder and the one parser. The
quantizer builds it here, and inspect, push, convert and the loader read it through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.packing import SUPPORTED_BITS
from ..errors import CheckpointError
from .spec import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    FUSED_EXPERTS_KEY,
    FUSED_ROLES,
    SHARED_STACK_KEY,
    STACKED_KEY,
    SUPPORTED_FORMAT_VERSIONS,
    fused_projections,
    shared_stack_prefixes,
)
from .tensor_headers import DAMAGED_HINT, MAKE_HINT


def build_quantization_config(
    *, method: str, method_options: dict[str, Any], weights: dict[str, Any], activations: dict[str, Any] | None,
    family: str, mask_token_id: int | None, logits_shift: bool, quantized_modules: list[str],
    module_overrides: dict[str, dict[str, Any]], modules_not_converted: list[str],
    transforms: dict[str, Any], calibration: dict[str, Any] | None, provenance: dict[str, Any],
    fused_experts: dict[str, Any] | None = None, shared_stack: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A checkpoint's ``quantization_config``, with its fields in the documented order.

    ``fused_experts`` (``format/stacked_experts.py``: what the stacking sink wrote) lists the fused
    experts modules: for those stored stacked, their per-expert names in ``quantized_modules``,
    ``module_overrides`` and ``transforms.modules`` (the unfused view's ``MODULE.E.PART``) become the
    stacked projections' (``MODULE.gate_up_proj``...); those stored unstacked (``"stacked": false``,
    weight-activation experts) keep their per-expert names, each an ordinary quantized linear with its
    own ops. ``shared_stack``: a second layer stack computing with the stored modules (``{"alias":
    prefix, "stored": prefix}``). Both are left out when None."""
    if fused_experts:
        quantized_modules, module_overrides, transforms = _fold_expert_names(
            fused_experts, quantized_modules, module_overrides, transforms)
    config = {
        "quant_method": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": method,
        "method_options": method_options,
        "weights": {key: weights[key] for key in ("bits", "group_size", "symmetric", "scale_dtype")},
        "activations": activations,
        "family": family,
        "dllm": {"mask_token_id": mask_token_id, "logits_shift": logits_shift},
        "quantized_modules": quantized_modules,
        "module_overrides": module_overrides,
        "modules_not_converted": modules_not_converted,
        "transforms": transforms,
        "calibration": calibration,
        "provenance": provenance,
    }
    if fused_experts:
        config[FUSED_EXPERTS_KEY] = fused_experts
    if shared_stack:
        config[SHARED_STACK_KEY] = dict(shared_stack)
    return config


def _fold_expert_names(fused: dict[str, Any], quantized: list[str], overrides: dict[str, dict[str, Any]],
                       transforms: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, Any]]:
    """The per-expert names of the unfused view of each stacked module replaced by their stacked
    projections' names (in order of first appearance); unstacked modules' names are kept. The stacking
    sink refused stacked experts of differing schemes, transforms or activations, so each stacked
    projection takes its first expert's override and has no ops."""
    stacked_of = {
        f"{module}.{e}.{part}": f"{module}.{entry[role]['module']}"
        for module, entry in fused.items() if entry.get(STACKED_KEY, True) for role in FUSED_ROLES
        for e in range(entry["num_experts"]) for part in entry[role]["parts"]
    }
    names = list(dict.fromkeys(stacked_of.get(name, name) for name in quantized))
    folded: dict[str, dict[str, Any]] = {}
    for name, override in overrides.items():
        folded.setdefault(stacked_of.get(name, name), dict(override))
    ops = dict((transforms or {}).get("modules") or {})
    if any(ops.get(name) for name in stacked_of):
        raise ValueError("stacked experts have online input ops; the stacking sink should have refused them")
    if transforms and "modules" in transforms:
        transforms = dict(transforms, modules={k: v for k, v in ops.items() if k not in stacked_of})
    return names, folded, transforms


def check_format_version(qconfig: dict[str, Any]) -> None:
    """Refuse a ``format_version`` this qdlm-export does not know (the loader and inspect alike)."""
    version = qconfig.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"qdlm format_version {version!r} is not supported by this qdlm-export (supports {SUPPORTED_FORMAT_VERSIONS})",
            hint="upgrade qdlm-export: pip install -U qdlm-export",
        )


def parse_quantization_config(config: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """The ``quantization_config`` of a checkpoint's config.json, checked field by field (a
    :class:`CheckpointError` naming the field and the file): the one reading of the schema."""
    qconfig = config.get("quantization_config")
    if not qconfig:
        raise CheckpointError(f"{config_file} has no quantization_config: this is not a quantized checkpoint",
                              hint=MAKE_HINT)
    if not isinstance(qconfig, dict):
        raise CheckpointError(f"quantization_config in {config_file} is not a JSON object", hint=DAMAGED_HINT)
    if qconfig.get("quant_method") != FORMAT_NAME:
        raise CheckpointError(
            f"quant_method is {qconfig.get('quant_method')!r}, not {FORMAT_NAME!r}",
            hint="inspect reads qdlm-native checkpoints; other formats load with their own toolkit",
        )
    check_format_version(qconfig)
    for key, kind in (("weights", dict), ("quantized_modules", list), ("method", str)):
        if key not in qconfig:
            raise CheckpointError(f"quantization_config in {config_file} has no {key!r} field; the checkpoint is incomplete",
                                  hint=DAMAGED_HINT)
        if not isinstance(qconfig[key], kind):
            raise CheckpointError(f"quantization_config[{key!r}] in {config_file} is not a {kind.__name__}",
                                  hint=DAMAGED_HINT)
    weights = qconfig["weights"]
    for key in ("bits", "group_size", "symmetric", "scale_dtype"):
        if key not in weights:
            raise CheckpointError(f"quantization_config.weights in {config_file} has no {key!r} field", hint=DAMAGED_HINT)
    # Types and ranges too: a string "4" or a bool where an int belongs must fail here, naming the
    # field, not later inside packing arithmetic.
    for key, ok, expected in (
        ("bits", lambda v: type(v) is int and v in SUPPORTED_BITS, f"one of {', '.join(map(str, SUPPORTED_BITS))} (an integer)"),
        ("group_size", lambda v: type(v) is int and (v == -1 or v > 0), "a positive integer or -1"),
        ("symmetric", lambda v: type(v) is bool, "true or false"),
    ):
        if not ok(weights[key]):
            raise CheckpointError(
                f"quantization_config.weights.{key} in {config_file} is {weights[key]!r}; expected {expected}",
                hint=DAMAGED_HINT,
            )
    if weights["scale_dtype"] not in DTYPES:
        raise CheckpointError(
            f"quantization_config.weights.scale_dtype in {config_file} is {weights['scale_dtype']!r}; "
            f"expected one of {', '.join(DTYPES)}", hint=DAMAGED_HINT,
        )
    if not all(isinstance(m, str) for m in qconfig["quantized_modules"]):
        raise CheckpointError(f"quantization_config.quantized_modules in {config_file} lists something that is not a "
                              "module name", hint=DAMAGED_HINT)
    fused_projections(qconfig)  # the fused experts (stacked or not) and shared stack sections, field by field
    prefixes = shared_stack_prefixes(qconfig)
    if prefixes is not None:
        copies = [m for m in qconfig["quantized_modules"] if m.startswith(prefixes[0])]
        if copies:
            raise CheckpointError(
                f"quantization_config.quantized_modules in {config_file} lists {copies[0]}, under the shared stack's "
                f"alias prefix {prefixes[0]!r}: the shared modules are stored once, under {prefixes[1]!r}",
                hint=DAMAGED_HINT)
    return qconfig
