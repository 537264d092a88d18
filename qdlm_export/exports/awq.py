"""Native qdlm -> AWQ, GEMM layout (``"version": "gemm"``), the layout AutoAWQ and GPTQModel read.

Per quantized linear ``NAME`` with ``in`` inputs, ``out`` outputs and ``G = in / group`` groups::

    NAME.qweight  int32   [in, out / 8]   4-bit codes packed along the *output* dimension
    NAME.qzeros   int32   [G, out / 8]    zero points, same packing, stored as they are (no -1)
    NAME.scales   float16 [G, out]
    NAME.bias     float16 [out]           when the linear has a bias

Dequantization: ``W^T[i, o] = (q[i, o] - z[i // group, o]) * scales[i // group, o]``.

Packing: word ``j`` of a row holds output columns ``8j .. 8j+7``, nibble ``k`` (bits ``4k..4k+3``)
holding column ``8j + ORDER[k]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (AWQ's interleave for its
GEMM kernel). Symmetric native weights become zero points of ``8``.

Only 4-bit weights, ``out`` a multiple of 8 and ``in`` a multiple of the group size are possible;
online transforms, activation quantization, a quantized head and scales that are not exactly
float16 are refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import ConfigError
from .export_format import (
    ExportFormat,
    ExportInventory,
    fp16_exact,
    loading_class,
    not_converted_linears,
    weight_only_problems,
)
from .gptq import LM_HEADS, _scale_error
from .quantized_module import LinearTensors, QuantizedModule

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column 8j + ORDER[k]
PACK = 8


def awq_group(qconfig: dict[str, Any], m: QuantizedModule) -> int:
    g = int(qconfig["weights"]["group_size"])
    return m.in_features if g == -1 else g


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` 4-bit values -> int32 ``[rows, cols / 8]`` in AWQ's interleaved order."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[..., list(ORDER)]  # nibble k <- column ORDER[k]
    shifts = torch.arange(PACK, dtype=torch.int64) * 4
    words = (v << shifts).sum(-1)
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def matches_awq_skip(name: str, patterns: list[str]) -> bool:
    """Whether a loader would skip ``name`` for an entry of ``modules_to_not_convert``. transformers:
    the entry matches from the start up to a module boundary (as a regex) or is a suffix of it; vLLM:
    the entry occurs anywhere in the name (which also covers the suffix rule). A router kept in
    float (``model.layers.3.mlp.gate``) must not be the start of a quantized ``...mlp.gate_proj``."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or p in name for p in patterns)


class AWQFormat(ExportFormat):
    name = "awq"
    title = "AWQ GEMM"

    def config_problems(self, qconfig: dict[str, Any]) -> list[str]:
        problems = weight_only_problems(qconfig, "AWQ", LM_HEADS)
        weights = qconfig.get("weights") or {}
        bits = {weights.get("bits")} | {o.get("bits") for o in (qconfig.get("module_overrides") or {}).values()}
        bits.discard(None)
        if bits - {4}:
            problems.append(
                f"{'/'.join(map(str, sorted(bits)))}-bit weights: the AWQ GEMM layout is 4-bit only "
                "(8 codes per int32 in its interleaved order)"
            )
        return problems

    def module_problems(self, m: QuantizedModule, qconfig: dict[str, Any]) -> list[str]:
        problems = []
        if m.out_features % PACK:
            problems.append(
                f"out_features {m.out_features} is not a multiple of 8: AWQ GEMM packs 8 output columns per int32"
            )
        g = awq_group(qconfig, m)
        if m.in_features % g:
            problems.append(f"in_features {m.in_features} is not a multiple of the checkpoint's group_size {g}")
        elif m.group % g:
            problems.append(
                f"its group_size {m.group_size} is finer than (or not a multiple of) the checkpoint's {g}; an AWQ "
                "checkpoint has one group size"
            )
        return problems

    def module_tensors(self, m: QuantizedModule, data: LinearTensors, qconfig: dict[str, Any]) -> dict[str, torch.Tensor]:
        group = awq_group(qconfig, m)
        native_group = torch.arange(m.in_features // group) * group // m.group
        native_scale = data.scale()
        scale, changed = fp16_exact(native_scale)
        if changed:
            raise _scale_error(m, changed, native_scale.dtype)
        codes_t = data.codes().t().contiguous()  # [in, out]
        zeros_t = data.zero_points()[:, native_group].t().contiguous()  # [G, out]
        tensors = {
            "qweight": pack_awq(codes_t),
            "qzeros": pack_awq(zeros_t),
            "scales": scale[:, native_group].t().contiguous(),
        }
        bias = data.bias()
        if bias is not None:
            tensors["bias"] = bias.to(torch.float16)
        return tensors

    def quantization_config(self, inventory: ExportInventory) -> dict[str, Any]:
        skip = not_converted_linears(inventory)
        clashes = [m.name for m in inventory.modules if matches_awq_skip(m.name, skip)]
        if clashes:
            raise ConfigError(
                f"cannot convert to AWQ: modules_to_not_convert would also skip quantized modules {clashes[:4]} "
                "(transformers matches these names as prefixes and suffixes, vLLM as substrings)",
                hint="convert to compressed-tensors instead (--to compressed-tensors), which lists modules exactly",
            )
        w = inventory.qconfig["weights"]
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": int(w["group_size"]),
            # Zero points are always stored (8 for symmetric weights). No "sym" key: GPTQModel reads
            # zero_point as its negation, and the two must not disagree.
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": skip or None,
        }

    def how_to_load(self, folder_name: str, config: dict[str, Any]) -> str:
        remote = ", trust_remote_code=True" if config.get("auto_map") else ""
        cls = loading_class(config)
        return (
            "## How to load\n\n"
            "This folder is a standard AWQ checkpoint (GEMM layout). transformers 5 loads AWQ through "
            "`gptqmodel`:\n\n"
            "```bash\npip install gptqmodel accelerate\n```\n\n"
            "```python\n"
            f"from transformers import {cls}\n\n"
            f'model = {cls}.from_pretrained("{folder_name}"{remote}, device_map="auto")\n'
            "```\n\n"
            "AWQ-capable servers (vLLM, SGLang) read the same layout.\n"
        )

    def format_note(self) -> str:
        return (
            "## Format\n\n"
            "AWQ, GEMM layout (`version: gemm`): per linear `qweight` (int32 `[in, out/8]`, 4-bit codes packed "
            "along the output dimension in AWQ's interleaved order), `qzeros` (same packing) and `scales` "
            "(float16 `[in/group, out]`). Converted exactly from a qdlm-export native checkpoint (the dequantized "
            "weights are identical); `qdlm_report.json` keeps the native `quantization_config` under `export`.\n"
        )


FORMAT = AWQFormat()
