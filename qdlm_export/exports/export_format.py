"""What an export target implements (:class:`ExportFormat`), what its config is built from
(:class:`ExportInventory`), and the refusals several targets share. The layouts (``gptq.py``,
``awq.py``, ``compressed_tensors.py``) build on this module; :mod:`.convert` and :mod:`.streaming` drive them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..format.spec import FUSED_EXPERTS_KEY, fused_projections
from .quantized_module import LinearTensors, QuantizedModule

# ---------------------------------------------------------------------------------------------
# What a target implements
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInventory:
    """What a target's ``quantization_config`` is built from, once every tensor is written."""

    qconfig: dict[str, Any]  # the native quantization_config
    modules: list[QuantizedModule]  # in qconfig["quantized_modules"] order
    passthrough: list[tuple[str, tuple[int, ...]]]  # (key, shape) of every tensor of no quantized module


class ExportFormat:
    """A target format. Subclasses fill in the hooks; refusals are returned as reasons (strings)."""

    name: str = ""
    title: str = ""  # for messages and the model card ("GPTQ (v1)")

    def config_problems(self, qconfig: dict[str, Any]) -> list[str]:
        """Scheme-level reasons this target cannot express the checkpoint (config only, no tensors).
        Must cope with partial configs (``check_convertible`` before quantizing)."""
        return []

    def module_problems(self, m: QuantizedModule, qconfig: dict[str, Any]) -> list[str]:
        """Shape/scheme reasons this target cannot hold one module (no tensor values read)."""
        return []

    def module_tensors(self, m: QuantizedModule, data: LinearTensors, qconfig: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The target's tensors of one module, by suffix (exact re-encoding; may raise on values).
        ``qconfig``: at least the native ``weights`` section."""
        raise NotImplementedError

    def passthrough(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor that belongs to no quantized module, as the target stores it (default: unchanged)."""
        return tensor

    def quantization_config(self, inventory: ExportInventory) -> dict[str, Any]:
        raise NotImplementedError

    def how_to_load(self, folder_name: str, config: dict[str, Any]) -> str:
        """Markdown for the model card's "How to load" section."""
        return ""

    def format_note(self) -> str:
        """Markdown for the model card's "Format" section."""
        return ""


# ---------------------------------------------------------------------------------------------
# Refusals shared by several targets (each target decides which apply)
# ---------------------------------------------------------------------------------------------


def online_transform_problem(qconfig: dict[str, Any], target: str) -> str | None:
    """Non-empty per-module online transforms (rotations, smoothing applied at run time)."""
    modules = (qconfig.get("transforms") or {}).get("modules") or {}
    kinds: dict[str, int] = {}
    for ops in modules.values():
        for op in ops:
            kind = op.get("op")
            if kind not in ("quantize_input", "quantize_output"):
                kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        return None
    listed = ", ".join(f"{k} ({n} module{'s' if n > 1 else ''})" for k, n in sorted(kinds.items()))
    return (
        f"the checkpoint applies online input transforms at run time ({listed}); {target} has no way to "
        "express transforms that the loader must apply to activations, so the converted model would compute "
        "a different function. Offline (fused) rotations are fine: quantize with a method or options that "
        "fold every transform into the weights, or keep the native format"
    )


def output_quant_problem(qconfig: dict[str, Any], target: str) -> str | None:
    modules = (qconfig.get("transforms") or {}).get("modules") or {}
    n = sum(1 for ops in modules.values() if any(op.get("op") == "quantize_output" for op in ops))
    if not n:
        return None
    return (
        f"{n} module(s) quantize their outputs (activations.qkv_bits, the q/k/v cache quantization); "
        f"{target} cannot express it"
    )


def activation_problem_weight_only(qconfig: dict[str, Any], target: str) -> str | None:
    acts = qconfig.get("activations")
    if not acts:
        return None
    return (
        f"the checkpoint quantizes activations ({acts.get('bits')}-bit, {acts.get('granularity', 'token')}); "
        f"{target} is a weight-only format and its loaders keep activations in floating point, which would "
        "silently change the model (use compressed-tensors for W8A8, or keep the native format)"
    )


def lm_head_problem(ckpt_or_qconfig: dict[str, Any], target: str, lm_head_names: tuple[str, ...]) -> str | None:
    quantized = set(ckpt_or_qconfig.get("quantized_modules") or [])
    heads = sorted(quantized & set(lm_head_names))
    if not heads:
        return None
    return (
        f"the output head ({', '.join(heads)}) is quantized; {target} loaders only replace linears inside the "
        "decoder blocks, so the head would load as a plain Linear without its weights. Quantize without "
        "--include-lm-head"
    )


def fp16_exact(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``scale`` in float16 and how many values changed (0: the conversion is exact)."""
    half = scale.to(torch.float16)
    if scale.dtype == torch.float16:
        return half, 0
    changed = int((half.to(scale.dtype) != scale).sum())
    return half, changed


def scale_dtype_problem(qconfig: dict[str, Any], target: str) -> str | None:
    """float32 scales essentially never convert exactly to the float16 that GPTQ/AWQ store."""
    dtype = ((qconfig.get("weights") or {}).get("scale_dtype")) or "float16"
    overrides = [o.get("scale_dtype") for o in (qconfig.get("module_overrides") or {}).values()]
    if dtype == "float32" or "float32" in overrides:
        return (
            f"{target} stores float16 scales and this checkpoint has float32 scales, which would be rounded "
            "(the converted weights would differ from the native ones). Quantize with --scale-dtype float16"
        )
    return None


def block_layout(names: list[str]) -> tuple[str, list[str]] | None:
    """``(block_prefix, [module suffix...])`` when every name is ``<prefix>.<i>.<suffix>`` under one
    block list; the suffixes are those of every block together, in first-seen order. Blocks may hold
    different modules (a dense first layer beside mixture-of-experts layers): a loader that matches
    these suffixes finds in each block only the modules that block has. Whether a suffix would also
    pick up a module kept in floating point is :func:`suffix_clashes`' question. None otherwise."""
    prefix = None
    suffixes: list[str] = []
    pattern = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
    for name in names:
        match = pattern.match(name)
        if not match or (prefix is not None and match.group(1) != prefix):
            return None
        prefix = match.group(1)
        if match.group(3) not in suffixes:
            suffixes.append(match.group(3))
    if prefix is None:
        return None
    return prefix, suffixes


def suffix_clashes(prefix: str, suffixes: list[str], kept: list[str]) -> list[tuple[str, str]]:
    """``(module, suffix)`` for each module of ``kept`` (left in floating point) inside the blocks
    under ``prefix`` that a loader selecting modules by these suffixes would also replace. optimum
    keeps a block's linear when its name ends with a listed entry, vLLM when an entry occurs in it;
    the substring test covers both."""
    inside = [k for k in kept if k.startswith(prefix + ".")]
    return [(k, s) for k in inside for s in suffixes if s in k]


def loading_class(config: dict[str, Any]) -> str:
    """The transformers Auto class that builds the family's model with its output head (what the
    model card tells users to load). LLaDA2's ``AutoModel`` is the base model without ``lm_head``, so
    the family adapter's class is used; families the package does not know fall back to the rule
    "remote code: AutoModel, else AutoModelForCausalLM"."""
    from ..errors import UnsupportedModelError
    from ..families import family_for_config

    try:
        auto = family_for_config(config).auto_class
    except UnsupportedModelError:
        auto = None
    if config.get("auto_map"):
        return auto if auto in config["auto_map"] else "AutoModel"
    return "AutoModelForCausalLM"


def not_converted_linears(inventory: ExportInventory) -> list[str]:
    """Modules kept in floating point that a loader replacing *every* Linear must be told to skip:
    ``modules_not_converted`` plus the owner of every other 2-D ``.weight`` (embeddings included;
    listing a non-Linear is harmless)."""
    names = list(inventory.qconfig.get("modules_not_converted") or [])
    for key, shape in inventory.passthrough:
        if key.endswith(".weight") and len(shape) == 2:
            owner = key[: -len(".weight")]
            if owner not in names:
                names.append(owner)
    return names


def weight_only_problems(qconfig: dict[str, Any], target: str, lm_head_names: tuple[str, ...]) -> list[str]:
    """What a weight-only, float16-scale target (GPTQ, AWQ) refuses in any checkpoint: online transforms,
    output or activation quantization, a quantized head, float32 scales, fused experts."""
    found = (
        online_transform_problem(qconfig, target),
        output_quant_problem(qconfig, target),
        activation_problem_weight_only(qconfig, target),
        lm_head_problem(qconfig, target, lm_head_names),
        scale_dtype_problem(qconfig, target),
    )
    return [p for p in found if p] + fused_experts_problems(qconfig, target) + _fused_experts_unchecked(qconfig, target)


# ---------------------------------------------------------------------------------------------
# Fused experts (experts stored as 3-D parameters: DiffusionGemma)
# ---------------------------------------------------------------------------------------------


def has_fused_experts(qconfig: dict[str, Any]) -> bool:
    """The checkpoint's experts are 3-D parameters of one module (``quantization_config.fused_experts``):
    an export stores them one linear per expert (``MODULE.E.PART``), the layout vLLM's loaders read."""
    return bool(qconfig.get(FUSED_EXPERTS_KEY))


def unfused_module_names(qconfig: dict[str, Any]) -> list[str]:
    """``quantized_modules`` with each stacked experts projection (``MODULE.gate_up_proj``) replaced by
    the per-expert linears it stacks, expert by expert (``MODULE.0.gate_proj``, ``MODULE.0.up_proj``,
    ``MODULE.1.gate_proj``...): the modules an export writes."""
    stacked = fused_projections(qconfig)
    names: list[str] = []
    for name in qconfig.get("quantized_modules") or []:
        fp = stacked.get(name)
        names += [name] if fp is None else [f"{fp.module}.{e}.{part}" for e in range(fp.experts) for part in fp.parts]
    return names


def fused_experts_problems(qconfig: dict[str, Any], target: str) -> list[str]:
    """What no target can express for fused experts: activation quantization (the native format stores
    them weight-only, and their grouped kernel is weight-only), and experts of one module quantized
    with several schemes (a gate/up projection falling back to another group size than the down
    projection: a serving engine's fused mixture-of-experts layer, vLLM's ``FusedMoE``, takes one
    scheme for all its projections). Copes with the partial config of ``check_convertible`` (per-expert
    names in ``quantized_modules`` and ``module_overrides``) as with a native checkpoint's (stacked)."""
    if not has_fused_experts(qconfig):
        return []
    problems = []
    if qconfig.get("activations"):
        problems.append(
            f"the checkpoint quantizes activations, and its experts are fused (3-D) parameters: the native format "
            f"keeps such experts unstacked (per-expert, \"stacked\": false), and {target} stores fused experts "
            "weight-only. Export a weight-only quantization of this family (--method rtn/gptq/awq)")
    names = list(qconfig.get("quantized_modules") or []) + list(qconfig.get("module_overrides") or {})
    for module in qconfig[FUSED_EXPERTS_KEY]:
        schemes = {effective_scheme(qconfig, n) for n in names if n.startswith(f"{module}.")}
        if len(schemes) > 1:
            problems.append(
                f"{module}: its experts' projections have different schemes ("
                f"{', '.join(sorted(_describe_scheme(s) for s in schemes))}); a fused mixture-of-experts layer "
                "(vLLM's FusedMoE) computes all its projections with one scheme. Pick a group size that divides "
                "every expert's input size, so that no projection falls back to another")
    return problems


def _fused_experts_unchecked(qconfig: dict[str, Any], target: str) -> list[str]:
    """GPTQ and AWQ of fused experts: transformers cannot load per-expert tensors into 3-D experts (no
    conversion stacks them; docs/EXPORTS.md, "DiffusionGemma"), and no loader of these layouts was
    checked for such a family, so the export would promise a model nobody was seen to load."""
    if not has_fused_experts(qconfig):
        return []
    return [(f"the model's experts are fused (3-D) parameters (DiffusionGemma): transformers cannot load per-expert "
             f"{target} tensors into them, and no {target} loader was checked for this family. Use --format "
             "compressed-tensors (served by vLLM) or the native format (transformers)")]


def effective_scheme(qconfig: dict[str, Any], name: str) -> tuple[int, int, bool]:
    """``(bits, group_size, symmetric)`` of module ``name``: the checkpoint's weights with its override."""
    weights = dict(qconfig.get("weights") or {}, **((qconfig.get("module_overrides") or {}).get(name) or {}))
    return weights.get("bits"), weights.get("group_size"), bool(weights.get("symmetric", True))


def _describe_scheme(scheme: tuple[int, int, bool]) -> str:
    bits, group, symmetric = scheme
    grouping = "per channel" if group == -1 else f"group {group}"
    return f"{bits}-bit {grouping} {'symmetric' if symmetric else 'asymmetric'}"
