"""The contract between the pipeline and a quantization method.

The pipeline walks the model one decoder block at a time. For each block it hands the method the
block (weights materialised, in the compute dtype, on the compute device) and, for methods that
need calibration, the block's captured inputs. The method returns a :class:`QuantizedWeight` for
every linear of the block and leaves the block *computing as the quantized block will*, so that
the pipeline can propagate calibration inputs to the next block through the quantized one.

Methods know adapters and schemes; they never know file formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from ..core.configs import WeightOnlyConfig
from ..errors import ConfigError
from ..families import FamilyAdapter
from ..core.schemes import QuantizedWeight, WeightScheme


@dataclass
class BlockCalibration:
    """Calibration inputs of one block: per batch, the hidden states and the other call arguments.

    ``call_args``/``call_kwargs`` are what the model passed to the block besides the hidden states
    (attention mask, rotary embeddings, position ids...), captured once, so a block can be re-run
    without knowing the family's forward signature.
    """

    hidden: list[torch.Tensor]
    call_args: list[tuple] = field(default_factory=list)
    call_kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    @torch.no_grad()
    def run(self, block: nn.Module, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run ``block`` on every batch; returns the output hidden states."""
        outputs = []
        for i, h in enumerate(hidden if hidden is not None else self.hidden):
            args = self.call_args[i] if self.call_args else ()
            kwargs = self.call_kwargs[i] if self.call_kwargs else {}
            out = block(h, *args, **kwargs)
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outputs


class _InputsSeen(Exception):
    """Raised by :meth:`BlockCalibration.feed` to stop a block's forward early."""


@torch.no_grad()
def feed_inputs(block: nn.Module, modules: dict[str, nn.Module], calib: "BlockCalibration",
                consume: Callable[[str, torch.Tensor], None]) -> dict[str, int]:
    """Run ``block`` on every calibration batch and hand each named module's input to
    ``consume(name, x)``; each batch's forward stops as soon as every module has received its input,
    so collecting the first group's inputs costs almost nothing and no batch runs the rest of the
    block. Returns how many batches reached each module (a module the forward never calls gets 0)."""
    seen: dict[str, int] = {name: 0 for name in modules}
    pending: set[str] = set()

    def pre_hook(name):
        def hook(module, args):
            consume(name, args[0].detach())
            seen[name] += 1
            pending.discard(name)
            if not pending:
                raise _InputsSeen

        return hook

    handles = [module.register_forward_pre_hook(pre_hook(name)) for name, module in modules.items()]
    try:
        for i, h in enumerate(calib.hidden):
            pending.update(modules)
            args = calib.call_args[i] if calib.call_args else ()
            kwargs = calib.call_kwargs[i] if calib.call_kwargs else {}
            try:
                block(h, *args, **kwargs)
            except _InputsSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def find_linear(block: nn.Module, name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, expected nn.Linear")
    return module


class QuantMethod:
    """Base class of every method. Subclasses set ``name``, ``config_class`` and ``quantize_block``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[WeightOnlyConfig]] = WeightOnlyConfig
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: WeightOnlyConfig, adapter: FamilyAdapter, model_config: Any):
        self.config = config
        self.adapter = adapter
        self.model_config = model_config
        self.scale_dtype = torch.float32
        # Layers that had to fall back to another scheme (recorded as module_overrides on disk).
        self.overrides: dict[str, dict[str, Any]] = {}

    def prepare(self, model: nn.Module) -> None:
        """Whole-model offline transforms before the block walk (rotations, centring). Default: none."""

    def transform_metadata(self) -> dict[str, Any]:
        """Facts about offline transforms already fused into the weights (rotation seed, smoothing
        alpha...), recorded in ``transforms`` for provenance; the loader does not need them."""
        return {}

    def layer_scheme(self, full_name: str, in_features: int) -> WeightScheme:
        """The scheme for one linear, applying the group-size fallback the user allowed."""
        scheme = self.config.scheme
        if scheme.group_size == -1 or in_features % scheme.group_size == 0:
            return scheme
        if self.config.group_fallback == "per-channel":
            self.overrides[full_name] = {"group_size": -1}
            return WeightScheme(bits=scheme.bits, group_size=-1, symmetric=scheme.symmetric)
        raise ConfigError(
            f"group size {scheme.group_size} does not divide the input size {in_features} of layer {full_name}",
            hint="choose a group size that divides it, use --group-size -1 (per channel), or pass "
            "--group-fallback per-channel to use per-channel scales for such layers only",
        )

    def quantize_block(
        self, block: nn.Module, prefix: str, calib: BlockCalibration | None
    ) -> dict[str, QuantizedWeight]:
        raise NotImplementedError

    @staticmethod
    def load_quantized(linear: nn.Linear, qweight: QuantizedWeight) -> None:
        """Make ``linear`` compute with the dequantized weight (so later blocks see quantized outputs)."""
        linear.weight.data = qweight.dequantize(linear.weight.dtype).to(linear.weight.device)
