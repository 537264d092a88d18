"""Native qdlm -> GPTQ (``checkpoint_format: "gptq"``, the v1 layout every GPTQ loader reads).

Per quantized linear ``NAME`` with ``in`` inputs, ``out`` outputs and ``G = in / group`` groups
(the layout of GPTQModel's ``nn_modules/qlinear``; docs/EXPORTS.md)::

    NAME.qweight  int32   [in * bits / 32, out]   codes packed along the *input* dimension
    NAME.qzeros   int32   [G, out * bits / 32]    zero points minus one (v1), packed along the output
    NAME.scales   float16 [G, out]
    NAME.g_idx    int32   [in]                    group of each input column: i // group (no act-order)
    NAME.bias     float16 [out]                   when the linear has a bias

Dequantization: ``W^T[i, o] = scales[g_idx[i], o] * (q[i, o] - (stored_zero[g_idx[i], o] + 1))``.

Packing. GPTQ packs a column of codes as one little-endian bit stream: code ``k`` at stream bit
``k * bits``, stream bit ``t`` in word ``t // 32``. For 2/4/8 bits that is ``32 / bits`` codes per
word; GPTQ's 3-bit layout packs 32 codes into 3 words with codes 10 and 21 straddling a word
boundary, which is the same stream. The native ``weight_packed`` is that stream along each row, so
``qweight = pack_rows(codes).T`` and ``qzeros = pack_rows((zeros - 1).T).T``; the stream must end
on a word boundary, hence ``in`` (and ``out``) divisible by 32 / bits (by 32 for 3 bits).

Refused, with the reason: online transforms, activation quantization, a quantized LM head, scales
that do not convert exactly to float16, and (asymmetric) zero points equal to 0, which v1 cannot
store (it stores ``zero - 1``; loaders add the 1 back per packed field, so -1 would overflow).
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.packing import pack_rows
from ..errors import ConfigError
from .export_format import (
    ExportFormat,
    ExportInventory,
    block_layout,
    fp16_exact,
    loading_class,
    not_converted_linears,
    suffix_clashes,
    weight_only_problems,
)
from .quantized_module import LinearTensors, QuantizedModule

LM_HEADS = ("lm_head", "model.transformer.ff_out")
BITS = (2, 3, 4, 8)


def pack_multiple(bits: int) -> int:
    """A packed dimension must be a multiple of this to end on a word boundary."""
    return 32 if bits == 3 else 32 // bits


def gptq_group(qconfig: dict[str, Any], m: QuantizedModule) -> int:
    """Columns per group in the GPTQ checkpoint for module ``m`` (one group size for all modules)."""
    g = int(qconfig["weights"]["group_size"])
    return m.in_features if g == -1 else g


class GPTQFormat(ExportFormat):
    name = "gptq"
    title = "GPTQ v1"

    def config_problems(self, qconfig: dict[str, Any]) -> list[str]:
        problems = weight_only_problems(qconfig, "GPTQ", LM_HEADS)
        weights = qconfig.get("weights") or {}
        if weights.get("bits") is not None and weights["bits"] not in BITS:
            problems.append(f"{weights['bits']}-bit weights: GPTQ stores {BITS} bits")
        for name, override in (qconfig.get("module_overrides") or {}).items():
            for field in ("bits", "symmetric"):
                if field in override and field in weights and override[field] != weights[field]:
                    problems.append(
                        f"{name} overrides {field}={override[field]} (checkpoint: {weights[field]}); a GPTQ "
                        "checkpoint has one bits/sym setting for every module (transformers' GPTQ loader ignores "
                        "GPTQModel's per-module `dynamic` overrides). Convert to compressed-tensors, which gives "
                        "each scheme its own config group"
                    )
        names = qconfig.get("quantized_modules")
        if names and block_layout([n for n in names if n not in LM_HEADS]) is None:
            problems.append(
                "the quantized modules do not all sit in one list of decoder blocks (<prefix>.<i>.<name>), "
                "which is how GPTQ loaders find them"
            )
        return problems

    def module_problems(self, m: QuantizedModule, qconfig: dict[str, Any]) -> list[str]:
        problems = []
        k = pack_multiple(m.bits)
        if m.in_features % k:
            problems.append(
                f"in_features {m.in_features} is not a multiple of {k}: GPTQ packs {m.bits}-bit codes along the "
                f"input dimension in whole int32 words ({'32 codes per 3 words' if m.bits == 3 else f'{k} per word'})"
            )
        if m.out_features % k:
            problems.append(
                f"out_features {m.out_features} is not a multiple of {k}: GPTQ packs the zero points along the "
                "output dimension in whole int32 words"
            )
        g = gptq_group(qconfig, m)
        if m.in_features % g:
            problems.append(
                f"in_features {m.in_features} is not a multiple of the checkpoint's group_size {g}; GPTQ gives "
                "every module that group size"
            )
        elif m.group % g:
            problems.append(
                f"its group_size {m.group_size} is finer than (or not a multiple of) the checkpoint's {g}; a GPTQ "
                "checkpoint has one group size and a module's groups can only be repeated into it, not split"
            )
        return problems

    def module_tensors(self, m: QuantizedModule, data: LinearTensors, qconfig: dict[str, Any]) -> dict[str, torch.Tensor]:
        group = gptq_group(qconfig, m)
        n_groups = m.in_features // group
        codes = data.codes()  # [out, in]
        zeros = data.zero_points().to(torch.int64)  # [out, native groups]
        native_scale = data.scale()
        scale, changed = fp16_exact(native_scale)
        if changed:
            raise _scale_error(m, changed, native_scale.dtype)
        # Map GPTQ groups onto native groups (identity unless the module is coarser, e.g. per channel).
        first_col = torch.arange(n_groups) * group
        native_group = first_col // m.group
        zeros = zeros[:, native_group]
        scale = scale[:, native_group]
        if bool((zeros == 0).any()):
            count = int((zeros == 0).sum())
            raise ConfigError(
                f"cannot convert to GPTQ: {m.name} has {count} group(s) with zero point 0; GPTQ v1 stores "
                "zero - 1 and its loaders add the 1 back per packed field, so 0 cannot be stored",
                hint="use --to awq or compressed-tensors (both store zero points as they are), or quantize "
                "symmetrically",
            )
        qweight = pack_rows(codes, m.bits).t().contiguous()  # each row's stream becomes a column: [in*bits/32, out]
        qzeros = pack_rows((zeros - 1).t().contiguous(), m.bits)  # [G, out*bits/32]
        tensors = {
            "qweight": qweight,
            "qzeros": qzeros,
            "scales": scale.t().contiguous(),
            "g_idx": (torch.arange(m.in_features, dtype=torch.int32) // group).to(torch.int32),
        }
        bias = data.bias()
        if bias is not None:
            tensors["bias"] = bias.to(torch.float16)
        return tensors

    def quantization_config(self, inventory: ExportInventory) -> dict[str, Any]:
        qconfig = inventory.qconfig
        w = qconfig["weights"]
        names = [m.name for m in inventory.modules]
        layout = block_layout(names)
        prefix, suffixes = layout if layout else (None, [])
        clashes = suffix_clashes(prefix, suffixes, not_converted_linears(inventory)) if layout else []
        if clashes:
            module, suffix = clashes[0]
            raise ConfigError(
                f"cannot convert to GPTQ: {module} is kept in floating point, but GPTQ loaders select the "
                f"quantized linears of every block by the names in modules_in_block_to_quantize, and {suffix!r} "
                f"(a quantized module's name within its block) also matches it, so it would load as an empty "
                f"quantized layer ({len(clashes)} such module(s))",
                hint="convert to compressed-tensors (--to compressed-tensors), which lists modules exactly, or "
                "quantize the same linears in every block",
            )
        return {
            "quant_method": "gptq",
            "bits": int(w["bits"]),
            "group_size": int(w["group_size"]),
            "desc_act": False,
            "sym": bool(w["symmetric"]),
            "true_sequential": True,
            "damp_percent": _damp(qconfig),
            "checkpoint_format": "gptq",
            "format": "gptq",
            "pack_dtype": "int32",
            "lm_head": False,
            "block_name_to_quantize": prefix,
            "modules_in_block_to_quantize": [suffixes] if suffixes else None,
            "meta": {"quantizer": [f"qdlm-export:{_tool_version(qconfig)}"], "qdlm_method": qconfig.get("method")},
        }

    def how_to_load(self, folder_name: str, config: dict[str, Any]) -> str:
        remote = ", trust_remote_code=True" if config.get("auto_map") else ""
        cls = loading_class(config)
        return (
            "## How to load\n\n"
            "This folder is a standard GPTQ checkpoint (v1 format). transformers loads it through "
            "`gptqmodel` (and `optimum`):\n\n"
            "```bash\npip install gptqmodel optimum\n```\n\n"
            "```python\n"
            f"from transformers import {cls}\n\n"
            f'model = {cls}.from_pretrained("{folder_name}"{remote}, device_map="auto")\n'
            "```\n\n"
            "GPTQModel's own `GPTQModel.load(...)` and GPTQ-capable servers (vLLM, SGLang) read the same "
            "layout.\n"
        )

    def format_note(self) -> str:
        return (
            "## Format\n\n"
            "GPTQ, `checkpoint_format: gptq` (v1): per linear `qweight` (int32, codes packed along the input "
            "dimension), `qzeros` (zero points minus one, packed along the output dimension), `scales` "
            "(float16) and `g_idx`. Converted exactly from a qdlm-export native checkpoint (the dequantized "
            "weights are identical); `qdlm_report.json` keeps the native `quantization_config` under "
            "`export`.\n"
        )


def _scale_error(m: QuantizedModule, changed: int, dtype: torch.dtype):
    return ConfigError(
        f"cannot convert {m.name}: {changed} of its {m.out_features * m.groups} {dtype_str(dtype)} scales are not "
        "exactly representable in float16, which GPTQ/AWQ store; the converted weights would differ",
        hint="quantize with --scale-dtype float16",
    )


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _damp(qconfig: dict[str, Any]) -> float:
    """GPTQ's dampening as recorded by the method (provenance only; loaders ignore it)."""
    damp = (qconfig.get("method_options") or {}).get("damp")
    return float(damp) if isinstance(damp, (int, float)) and 0 < damp < 1 else 0.01


def _tool_version(qconfig: dict[str, Any]) -> str:
    return str((qconfig.get("provenance") or {}).get("tool_version") or "")


FORMAT = GPTQFormat()
