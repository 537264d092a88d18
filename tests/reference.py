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


def fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip: float, scale=None, zero=None) -> torch.Tensor:
    """docs/FORMAT.md's activation quantizer in float64: per row (``scale`` None) or static."""
    x = x.double()
    rnd = lambda v: torch.floor(v.abs() + 0.5) * torch.sign(v)  # noqa: E731 (half away from zero)
    if scale is None:
        lo = x.amin(-1, keepdim=True).clamp(max=0) * clip
        hi = x.amax(-1, keepdim=True).clamp(min=0) * clip
        if symmetric:
            scale = torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1)
        else:
            scale = (hi - lo) / (2**bits - 1)
            zero = rnd(-lo / scale).clamp(0, 2**bits - 1)
    scale = torch.as_tensor(scale).double()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return rnd(x / scale).clamp(-qmax, qmax) * scale
    zero = torch.as_tensor(zero).double()
    return ((rnd(x / scale) + zero).clamp(0, 2**bits - 1) - zero) * scale


def spec_ops(x: torch.Tensor, ops: list[dict], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """docs/FORMAT.md's transform ops in float64, written from the table (dense Hadamard matrices).

    The one exception to "no qdlm_export code": the format's Hadamard matrices, whose definition
    tests/core/test_hadamard_widths.py checks on its own (orthogonality, the construction rules)."""
    from qdlm_export.core.hadamard import hadamard_matrix

    for op in ops:
        kind = op["op"]
        if kind == "smooth":
            x = x / tensors["input_smooth"].double()
        elif kind == "hadamard":
            n, stride = op["size"], op["stride"]
            view = x.reshape(*x.shape[:-1], x.shape[-1] // (n * stride), n, stride)
            x = torch.einsum("...gis,ij->...gjs", view, hadamard_matrix(n)).reshape(x.shape)
        elif kind == "block_rotation":
            R = tensors[op["tensor"]].double()
            b = op["block_size"]
            view = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
            R = R.expand(view.shape[-2], b, b) if R.shape[0] == 1 else R
            x = torch.einsum("...kb,kbc->...kc", view, R).reshape(x.shape)
        elif kind == "permute":
            x = x[..., tensors[op["tensor"]]]
    return x
