"""Which kernel backends the loader would run a checkpoint's quantized linears on (``inspect``); for a
routed expert, also whether its block computes through the grouped expert GEMM (``grouped_experts.py``);
a fused experts module's stacked projections always do (``fused_experts.py``), and the experts of one
stored unstacked (weight-activation) run one by one, each on its own linear's kernels. Modules a second
layer stack computes with too (``quantization_config.shared_stack``) say so."""

from __future__ import annotations

from pathlib import Path

import torch

from ..format.spec import (
    FusedProjection,
    LinearSpec,
    checkpoint_dtype,
    fused_projections,
    shared_stack_prefixes,
    unstacked_projections,
)
from ..format.validation import validate_checkpoint
from ..core.transforms import transform_ops
from ..kernels import describe_backend
from ..kernels.hadamard import describe_online_hadamard
from .grouped_experts import planned_paths, prefers_grouped
from .hf_quantizer import uses_integer_input


def describe_kernels(spec: LinearSpec, device: torch.device | str, tokens: int, dtype: torch.dtype,
                     expert_path: str | None = None) -> str:
    """Which kernel backends the loader would run this linear on (``inspect``), for ``tokens`` rows;
    ``expert_path``: a routed expert's path (:func:`~.grouped_experts.planned_paths`)."""
    shapes = dict(M=tokens, in_features=spec.in_features, out_features=spec.out_features, bits=spec.bits,
                  group_size=spec.group_size, symmetric=spec.symmetric, dtype=dtype)
    if expert_path is not None and expert_path.startswith("grouped"):
        if prefers_grouped(device, dtype, spec):
            return f"{expert_path}: {describe_backend('grouped_expert_gemm', device, **shapes)}"
        expert_path = "published per-expert loop here: the per-expert kernels beat the grouped torch reference"
    parts = [f"hadamard({op['size']}): {describe_online_hadamard(device, op['size'])}"
             for op in spec.input_transforms if op.get("op") == "hadamard"]
    if uses_integer_input(spec):
        # QdlmLinear's two steps; the quantizer sees float32 after online transforms (_transformed), else
        # the model's own rows
        act_dtype = torch.float32 if transform_ops(spec.input_transforms) else dtype
        parts.append(describe_backend("w4a4_linear", device, act_bits=spec.input_activation.bits,
                                      act_dtype=act_dtype, **shapes))
    else:
        parts.append(describe_backend("weight_only_linear", device, **shapes))
    if expert_path is not None:
        parts.append(expert_path)
    return "; ".join(parts)


def describe_fused(spec: LinearSpec, projection: FusedProjection, device: torch.device | str, tokens: int,
                   dtype: torch.dtype) -> str:
    """A fused experts module's stacked projection: one grouped expert GEMM over its experts."""
    shapes = {"M": tokens, "in_features": spec.in_features, "out_features": spec.out_features, "bits": spec.bits,
              "group_size": spec.group_size, "symmetric": spec.symmetric, "dtype": dtype}
    split = "+".join(map(str, projection.rows))
    return (f"fused experts, {projection.experts} stacked ({'/'.join(projection.parts)} rows {split}): "
            f"{describe_backend('grouped_expert_gemm', device, **shapes)}")


def kernel_plans(folder: str | Path, *, device: torch.device | str, tokens: int) -> dict[str, str]:
    """Module -> :func:`describe_kernels` (:func:`describe_fused` for stacked experts) for every quantized
    module of the checkpoint ``folder`` (validated again: headers only), in the dtype the checkpoint
    loads in."""
    checked = validate_checkpoint(folder)
    qconfig = checked.qconfig or {}
    dtype = checkpoint_dtype(checked.config)
    experts = planned_paths(checked.specs, qconfig.get("family"))
    fused = fused_projections(qconfig)
    unstacked = {name: fp for fp in unstacked_projections(qconfig).values() for name in fp.expert_linears()}
    shared = shared_stack_prefixes(qconfig)
    plans = {}
    for name, spec in checked.specs.items():
        if name in fused:
            plan = describe_fused(spec, fused[name], device, tokens, dtype)
        elif name in unstacked:  # online ops and activation quantizers per expert: no grouped GEMM
            plan = describe_kernels(spec, device, tokens, dtype,
                                    f"fused experts {unstacked[name].module} stored unstacked: per-expert loop")
        else:
            plan = describe_kernels(spec, device, tokens, dtype, experts.get(name))
        if shared is not None and name.startswith(shared[1]):
            plan += f"; both stacks ({shared[1]}* and {shared[0]}*, stored once)"
        plans[name] = plan
    return plans
