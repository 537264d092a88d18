"""Native qdlm -> compressed-tensors (the format of llm-compressor, read by stock transformers and vLLM).

Weight-only checkpoints become ``pack-quantized``; the native layout was chosen to match it, so most
tensors are copied unchanged::

    NAME.weight_packed      int32  [out, ceil(in*bits/32)]   identical bytes: CT packs the signed code
                                                             plus 2^(bits-1), which is the native code
    NAME.weight_scale       [out, groups] (per channel: [out, 1]), native dtype
    NAME.weight_shape       int64  [2]
    NAME.weight_zero_point  int32  [ceil(out*bits/32), groups]   asymmetric only: the native unsigned
                                                             zeros packed along dim 0 (= CT's signed
                                                             zero plus 2^(bits-1), packed)
    NAME.bias               unchanged

W8A8 (8-bit symmetric per-channel weights, dynamic symmetric per-token 8-bit activations, i.e. CT's
``W8A8`` preset) becomes ``int-quantized``: ``NAME.weight`` int8 ``[out, in]`` = code - 128 and
``NAME.weight_scale`` ``[out, 1]``; activation scales are computed at run time, so nothing is stored.

CT's dynamic per-token int8 quantizer is not bit-identical to the native one: it divides the
token's absmax by 127.5 and clamps to [-128, 127] with round-half-to-even, while the native loader
uses absmax / 127, [-127, 127] and round-half-away. The weights are identical; activations differ by
at most one quantization step (docs/EXPORTS.md measures the effect).

Refused: online transforms (rotations/smoothing applied at run time: CT's ``transform_config`` is
dropped by transformers), quantized outputs (qkv_bits), activation schemes other than the W8A8
preset (4-bit activations, clipped or asymmetric activations, static scales), and activation
quantization with weights other than 8-bit symmetric per channel.

Fused experts (DiffusionGemma: experts stored as 3-D parameters) are written one linear per expert,
``MODULE.E.{gate,up,down}_proj.*``, which vLLM loads into its fused mixture-of-experts layers and no
transformers loader reads into the 3-D parameters; so what vLLM cannot load is refused as well: weights
other than 4/8-bit symmetric, and more than one scheme (docs/EXPORTS.md, "DiffusionGemma").
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.packing import pack_rows
from ..errors import ConfigError
from .export_format import (
    ExportFormat,
    ExportInventory,
    effective_scheme,
    fused_experts_problems,
    has_fused_experts,
    loading_class,
    not_converted_linears,
    online_transform_problem,
    output_quant_problem,
)
from .quantized_module import LinearTensors, QuantizedModule

CT_LAYOUT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writes (checked against)
PACK_BITS = (2, 3, 4, 8)
# Fused (3-D) experts: no transformers loader reads per-expert tensors into them, so the export is for
# vLLM, whose compressed-tensors mixture-of-experts methods take 4- and 8-bit symmetric pack-quantized
# weights, one scheme per layer (docs/EXPORTS.md, "DiffusionGemma").
VLLM_MOE_BITS = (4, 8)
LM_HEADS = ("lm_head",)


def _activation_kind(acts: dict[str, Any] | None) -> str | None:
    """None (weight-only), "w8a8-dynamic" or a reason the activation scheme cannot be expressed."""
    if not acts:
        return None
    bits = acts.get("bits")
    granularity = acts.get("granularity", "token")
    if bits != 8:
        return f"{bits}-bit activations: only 8-bit activations are exported (CT's W8A8 preset)"
    if granularity != "token":
        return (
            f"{granularity} (static) activation scales: only dynamic per-token activations are exported "
            "(CT's W8A8 preset)"
        )
    if not acts.get("symmetric", True):
        return "asymmetric activations: only symmetric per-token activations are exported (CT's W8A8 preset)"
    if float(acts.get("clip_ratio", 1.0)) != 1.0:
        return (
            f"activation clip_ratio {acts.get('clip_ratio')}: compressed-tensors has no activation clipping, so "
            "the loader would quantize activations on a different grid"
        )
    return "w8a8-dynamic"


def _weights_args(bits: int, group_size: int, symmetric: bool) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "dynamic": False,
    }


W8A8_INPUT = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}


def _vllm_moe_problems(qconfig: dict[str, Any]) -> list[str]:
    """What vLLM, the one loader of a fused-experts model's per-expert compressed-tensors tensors, cannot
    load: weights other than 4/8-bit symmetric (its mixture-of-experts methods assert both), and more
    than one scheme (only ``targets: ["Linear"]`` reaches every layer: per-module targets miss the fused
    q/k/v of DiffusionGemma's full-attention layers, whose v_proj the checkpoint lacks, and depend on
    vLLM's renaming of the experts, which differs between its releases)."""
    names = list(qconfig.get("quantized_modules") or []) + list(qconfig.get("module_overrides") or {})
    schemes = {effective_scheme(qconfig, n) for n in names} or {effective_scheme(qconfig, "")}
    problems = []
    bits = sorted({b for b, _, _ in schemes if b is not None and b not in VLLM_MOE_BITS})
    if bits:
        problems.append(f"{'/'.join(map(str, bits))}-bit weights: vLLM computes compressed-tensors experts "
                        f"(pack-quantized) in {' and '.join(map(str, VLLM_MOE_BITS))} bits only")
    if any(not symmetric for _, _, symmetric in schemes):
        problems.append("asymmetric weights: vLLM's compressed-tensors mixture-of-experts methods take symmetric "
                        "weights only; quantize with --symmetric")
    if len(schemes) > 1:
        odd = sorted(n for n in names if effective_scheme(qconfig, n) != effective_scheme(qconfig, ""))
        problems.append(
            f"{len(odd)} module(s) (e.g. {odd[0] if odd else '?'}) have another scheme than the rest (a group-size "
            "fallback): vLLM's DiffusionGemma needs one scheme for the whole model (targets [\"Linear\"]). Pick a "
            "group size that divides every linear's input size (64 for the published DiffusionGemma)")
    return problems


class CompressedTensorsFormat(ExportFormat):
    name = "compressed-tensors"
    title = "compressed-tensors"

    def config_problems(self, qconfig: dict[str, Any]) -> list[str]:
        problems = [
            p for p in (
                online_transform_problem(qconfig, "compressed-tensors (as loaded by transformers)"),
                output_quant_problem(qconfig, "compressed-tensors export"),
            ) if p
        ]
        kind = _activation_kind(qconfig.get("activations"))
        weights = qconfig.get("weights") or {}
        if kind not in (None, "w8a8-dynamic"):
            problems.append(kind)
        elif kind == "w8a8-dynamic":
            schemes = [weights] + [dict(weights, **o) for o in (qconfig.get("module_overrides") or {}).values()]
            for s in schemes:
                if s and (s.get("bits") != 8 or s.get("group_size") != -1 or not s.get("symmetric", True)):
                    problems.append(
                        f"activation quantization with {s.get('bits')}-bit "
                        f"{'per-channel' if s.get('group_size') == -1 else 'group-' + str(s.get('group_size'))} "
                        f"{'symmetric' if s.get('symmetric', True) else 'asymmetric'} weights: compressed-tensors "
                        "int-quantized W8A8 needs 8-bit symmetric per-channel weights"
                    )
                    break
            modules = (qconfig.get("transforms") or {}).get("modules")
            names = qconfig.get("quantized_modules")
            if names is not None and modules is not None:
                plain = [n for n in names if not any(op.get("op") == "quantize_input" for op in modules.get(n, []))]
                if plain:
                    problems.append(
                        f"{len(plain)} quantized module(s) (e.g. {plain[0]}) keep float inputs while others quantize "
                        "them; the W8A8 export quantizes the inputs of every quantized module"
                    )
        elif weights.get("bits") is not None and weights["bits"] not in PACK_BITS:
            problems.append(f"{weights['bits']}-bit weights cannot be packed")
        if has_fused_experts(qconfig):
            problems += fused_experts_problems(qconfig, "compressed-tensors") + _vllm_moe_problems(qconfig)
        return problems

    def module_problems(self, m: QuantizedModule, qconfig: dict[str, Any]) -> list[str]:
        if m.group_size != -1 and m.in_features % m.group_size:
            return [f"in_features {m.in_features} is not a multiple of group_size {m.group_size}"]
        return []

    def module_tensors(self, m: QuantizedModule, data: LinearTensors, qconfig: dict[str, Any]) -> dict[str, torch.Tensor]:
        if m.quantizes_input:  # W8A8: int-quantized, unpacked int8 weight
            codes = data.codes().to(torch.int16) - 128
            tensors = {"weight": codes.to(torch.int8), "weight_scale": data.scale().contiguous()}
        else:
            tensors = {
                "weight_packed": data.packed(),
                "weight_scale": data.scale().contiguous(),
                "weight_shape": m.weight_shape(),
            }
            if not m.symmetric:
                zeros = data.zero_points()  # [out, groups] unsigned = CT signed zero + 2^(bits-1)
                tensors["weight_zero_point"] = pack_rows(zeros.t().contiguous(), m.bits).t().contiguous()
        bias = data.bias()
        if bias is not None:
            tensors["bias"] = bias
        return tensors

    def quantization_config(self, inventory: ExportInventory) -> dict[str, Any]:
        groups: dict[tuple, list[str]] = {}
        for m in inventory.modules:
            key = (m.bits, m.group_size, m.symmetric, m.quantizes_input)
            groups.setdefault(key, []).append(m.name)
        ignore = not_converted_linears(inventory)
        quantized = {m.name for m in inventory.modules}
        for head in LM_HEADS:  # a tied head has no tensor of its own but is still a Linear
            if head not in quantized and head not in ignore:
                ignore.append(head)
        config_groups: dict[str, Any] = {}
        formats = set()
        for i, ((bits, group_size, symmetric, act), names) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
            fmt = "int-quantized" if act else "pack-quantized"
            formats.add(fmt)
            config_groups[f"group_{i}"] = {
                "targets": ["Linear"] if len(groups) == 1 else sorted(names),
                "weights": _weights_args(bits, group_size, symmetric),
                "input_activations": dict(W8A8_INPUT) if act else None,
                "output_activations": None,
                "format": fmt,
            }
        if not config_groups:
            raise ConfigError(
                "the checkpoint quantizes no modules; there is nothing to convert",
                hint="the checkpoint already loads as a full-precision model; use it as it is",
            )
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_LAYOUT_VERSION,
        }

    def how_to_load(self, folder_name: str, config: dict[str, Any]) -> str:
        if _fused_experts_family(config):
            return _how_to_serve_with_vllm(folder_name)
        remote = ", trust_remote_code=True" if config.get("auto_map") else ""
        cls = loading_class(config)
        groups = (config.get("quantization_config") or {}).get("config_groups") or {}
        asymmetric = any(not (g.get("weights") or {}).get("symmetric", True) for g in groups.values())
        extra = ", quantization_config=CompressedTensorsConfig(dequantize=True)" if asymmetric else ""
        imports = f"{cls}, AutoTokenizer" + (", CompressedTensorsConfig" if asymmetric else "")
        text = (
            "## How to load\n\n"
            "This folder is a compressed-tensors checkpoint: stock transformers loads it (CPU or GPU) with the "
            "`compressed-tensors` package, no qdlm-export needed:\n\n"
            "```bash\npip install transformers compressed-tensors\n```\n\n"
            "```python\n"
            f"from transformers import {imports}\n\n"
            f'model = {cls}.from_pretrained("{folder_name}"{remote}, dtype="auto"{extra})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}"{remote})\n'
            "```\n"
        )
        if asymmetric:
            text += (
                "\nThe weights are asymmetric (packed zero points). transformers' default compressed path does "
                "not accept packed asymmetric zero points (compressed-tensors 0.20 / transformers 5.24), hence "
                "`dequantize=True`, which rebuilds dense weights at load time.\n"
            )
        return text + (
            "\nInference servers that read compressed-tensors (vLLM, SGLang) accept the same folder for the "
            "architectures they support.\n"
        )

    def format_note(self) -> str:
        return (
            "## Format\n\n"
            "compressed-tensors (`quant_method: compressed-tensors`): `pack-quantized` weight-only linears "
            "(`weight_packed`, `weight_scale`, `weight_shape`) or `int-quantized` W8A8 linears (int8 `weight`, "
            "per-channel `weight_scale`, dynamic per-token activations). Converted exactly from a qdlm-export "
            "native checkpoint (the dequantized weights are identical); `qdlm_report.json` keeps the native "
            "`quantization_config` under `export`.\n"
        )


def _fused_experts_family(config: dict[str, Any]) -> bool:
    """The model's family stores its experts as 3-D parameters (DiffusionGemma)."""
    from ..errors import UnsupportedModelError
    from ..families import family_for_config

    try:
        return family_for_config(config).fused_experts is not None
    except UnsupportedModelError:
        return False


def _how_to_serve_with_vllm(folder_name: str) -> str:
    return (
        "## How to load\n\n"
        "This folder is a compressed-tensors checkpoint laid out for vLLM, which reads its per-expert tensors "
        "into its fused mixture-of-experts layers:\n\n"
        f"```bash\npip install vllm\nvllm serve {folder_name}\n```\n\n"
        "Stock transformers (5.24, compressed-tensors 0.20) cannot load it: its model keeps the experts as 3-D "
        "parameters (`experts.gate_up_proj`, `experts.down_proj`) with no conversion that stacks per-expert "
        "tensors into them, and compressed-tensors' layout breaks the tie between the causal encoder's and the "
        "decoder's Linears. Registering that conversion and loading with "
        "`CompressedTensorsConfig(dequantize=True)` gives transformers the dequantized (dense) model; the native "
        "qdlm-export checkpoint of the same model loads quantized.\n"
    )


FORMAT = CompressedTensorsFormat()
