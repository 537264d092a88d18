"""torchao's quantized linears as peers of ours, built from the same float weights (``bench --peers``).

    torchao_unavailable_reason() -> str | None
    build_peers(weight, dtype) -> {peer name: quantized nn.Linear}

Two peers, each paired with the op of ours that does the same arithmetic:

* ``int4_weight_only`` (ours: ``weight_only``, W4 g128): torchao's CPU int4 path, which runs
  ``aten._weight_int4pack_mm_for_cpu`` (tinygemm layout, asymmetric per-group qparams; ours are
  symmetric). Its config moved between torchao releases; the first that quantizes is used.
* ``int8_dynamic`` (ours: ``w8a8``): ``Int8DynamicActivationInt8WeightConfig``, per-token int8
  activations times per-channel int8 weights, as ours.

They run in eager mode, as ``quantize_`` leaves a module: torchao's fast CPU paths for the dynamic
int8 scheme come from ``torch.compile``, which this benchmark does not apply to any candidate.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

# peer -> our op with the same arithmetic (rows of bench/kernels.py)
PEER_OF = {"int4_weight_only": "weight_only", "int8_dynamic": "w8a8"}
PEER_GROUP_SIZE = 128


def torchao_unavailable_reason() -> str | None:
    """None when torchao imports, else a sentence saying how to get it."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    except Exception as exc:  # a broken install (e.g. built for another torch): say what, don't crash bench
        return f"torchao failed to import ({type(exc).__name__}: {exc})"
    return None


def torchao_version() -> str | None:
    try:
        import torchao
    except Exception:
        return None
    return getattr(torchao, "__version__", "unknown")


def _int4_configs(group_size: int) -> list[tuple[str, Callable[[], Any]]]:
    """Candidate configs of torchao's CPU int4 weight-only path, newest release first."""

    def prototype():  # torchao >= 0.16: the CPU layout lives in the prototype namespace
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)

    def opaque():  # torchao 0.14-0.15: a packing format of the stable config
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="opaque", set_inductor_config=False)

    def cpu_layout():  # older torchao: a layout object
        from torchao.dtypes import Int4CPULayout
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size, layout=Int4CPULayout(), set_inductor_config=False)

    return [
        (f"PrototypeInt4WeightOnlyConfig(group_size={group_size})", prototype),
        (f"Int4WeightOnlyConfig(group_size={group_size}, int4_packing_format='opaque')", opaque),
        (f"Int4WeightOnlyConfig(group_size={group_size}, layout=Int4CPULayout())", cpu_layout),
    ]


def _int8_configs() -> list[tuple[str, Callable[[], Any]]]:
    def dynamic():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)

    return [("Int8DynamicActivationInt8WeightConfig()", dynamic)]


def _quantized_linear(weight: torch.Tensor, dtype: torch.dtype, configs) -> tuple[nn.Linear, str]:
    """``weight [N, K]`` as a torchao-quantized linear (no bias), with the config's description."""
    from torchao.quantization import quantize_

    failures = []
    for label, make in configs:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
        try:
            quantize_(linear, make())
        except Exception as exc:  # a config this torchao release lacks or refuses: try the next one
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        if type(linear.weight) in (nn.Parameter, torch.Tensor):  # quantized weights are tensor subclasses
            failures.append(f"{label}: left the weight unquantized")
            continue
        return linear, label
    raise RuntimeError("no torchao config quantized this weight: " + "; ".join(failures))


def build_peers(weight: torch.Tensor, dtype: torch.dtype, group_size: int = PEER_GROUP_SIZE) -> dict[str, dict]:
    """Every peer of ``weight [N, K]`` (float) for activations in ``dtype``:
    ``{name: {"module", "config", "our_op"}}``, or ``{"error": ...}`` for one that cannot be built."""
    peers: dict[str, dict] = {}
    for name, configs in (("int4_weight_only", _int4_configs(group_size)), ("int8_dynamic", _int8_configs())):
        try:
            module, label = _quantized_linear(weight, dtype, configs)
        except (RuntimeError, ImportError) as exc:
            peers[name] = {"error": str(exc), "our_op": PEER_OF[name]}
            continue
        peers[name] = {"module": module.eval(), "config": label, "our_op": PEER_OF[name]}
    return peers


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    ref = reference.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
