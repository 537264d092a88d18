"""Independent references for tests: unpacking and dequantizing a qdlm checkpoint straight from
docs/FORMAT.md, without any qdlm_export code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Expand each int32 word into its 32 bits (LSB first), concatenate, read ``bits``-bit codes."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    stream = ((words.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(packed.shape[0], -1)
    stream = stream[:, : cols * bits].reshape(packed.shape[0], cols, bits)
    return (stream << torch.arange(bits)).sum(-1)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors


def dequantized_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Module name -> float64 dense weight, following the format spec literally."""
    qconfig = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    tensors = load_tensors(folder)
    result = {}
    for name in qconfig["quantized_modules"]:
        w = dict(qconfig["weights"], **qconfig.get("module_overrides", {}).get(name, {}))
        out, inp = tensors[f"{name}.weight_shape"].tolist()
        codes = unpack_bits(tensors[f"{name}.weight_packed"], w["bits"], inp).double()
        group = inp if w["group_size"] == -1 else w["group_size"]
        scale = tensors[f"{name}.weight_scale"].double().repeat_interleave(group, dim=1)
        if w["symmetric"]:
            zero = 2 ** (w["bits"] - 1)
        else:
            zero = tensors[f"{name}.weight_zero_point"].double().repeat_interleave(group, dim=1)
        result[name] = (codes - zero) * scale
    return result
