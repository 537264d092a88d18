"""The contract between the pipeline and a quantization method.

The pipeline walks the model one decoder block at a time. For each block it hands the method the
block (weights materialised, in the compute dtype, on the compute device) and, for methods that
need calibration, the block's captured inputs. The method returns a :class:`QuantizedWeight` for
every linear of the block and leaves the block *computing as the quantized block will*, so that
the pipeline can propagate calibration inputs to the next block through the quantized one.

The LM head (``--include-lm-head``) goes through the same code: :class:`HeadBlock` makes the final
norm and the head a one-group block, calibrated on the final norm's inputs.

Methods know adapters and schemes; they never know file formats. A method that leaves modules other
than float linears in the block (the weight-activation methods leave the loader's quantized linear,
so calibration propagates through what ``from_pretrained`` computes) receives a builder for them,
:data:`QuantizedLinearBuilder`, from the stage that knows the format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from ..core.configs import WeightActivationConfig, WeightOnlyConfig
from ..core.schemes import QuantizedWeight, WeightScheme, quantize_rtn
from ..errors import ConfigError
from ..families import FamilyAdapter, LinearGroup
from .capture import LinearOutputMemo


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
    # While the pipeline lets a method reuse linear outputs between passes over one block
    # (``reusing_linear_outputs``): the memo every pass over ``hidden`` goes through.
    memo: LinearOutputMemo | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.hidden)

    def forward(self, block: nn.Module, index: int, hidden: torch.Tensor | None = None) -> Any:
        """``block``'s output on batch ``index`` (its hidden states, or ``hidden`` with its other
        arguments); every pass over the calibration batches runs through here."""
        args = self.call_args[index] if self.call_args else ()
        kwargs = self.call_kwargs[index] if self.call_kwargs else {}
        if hidden is not None or self.memo is None:
            return block(self.hidden[index] if hidden is None else hidden, *args, **kwargs)
        with self.memo.batch(index):
            return block(self.hidden[index], *args, **kwargs)

    @torch.no_grad()
    def run(self, block: nn.Module, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run ``block`` on every batch; returns the output hidden states."""
        outputs = []
        for i in range(len(self) if hidden is None else len(hidden)):
            out = self.forward(block, i, None if hidden is None else hidden[i])
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outputs

    @contextmanager
    def reusing_linear_outputs(self, block: nn.Module, budget_bytes: int | None = None) -> Iterator[LinearOutputMemo]:
        """Passes over the batches inside the ``with`` body reuse the outputs of ``block``'s linears
        that have not changed since the previous pass (:class:`~.capture.LinearOutputMemo`); the
        caller reports changed linears with :meth:`linears_changed`."""
        with LinearOutputMemo(block, budget_bytes) as memo:
            self.memo = memo
            try:
                yield memo
            finally:
                self.memo = None

    def linears_changed(self, modules: Iterable[nn.Module]) -> None:
        """``modules`` now compute with new weights (a no-op when no memo is in use)."""
        if self.memo is not None:
            self.memo.changed(modules)


# Why a routed expert's linear was quantized without calibration (``QuantMethod.calibration_fallbacks``).
NO_ROUTED_TOKENS = "the router sent it no calibration tokens"


def find_linear(block: nn.Module, name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, expected nn.Linear")
    return module


# (full module name, its QuantizedWeight with input_transforms/extra_tensors, the activation settings
# of quantization_config or None, device) -> a module computing exactly what the loader will compute.
QuantizedLinearBuilder = Callable[[str, QuantizedWeight, "dict[str, Any] | None", torch.device], nn.Module]


def qualified(prefix: str, name: str) -> str:
    """The full module name of ``name`` inside the module called ``prefix`` (``""``: the model)."""
    return f"{prefix}.{name}" if prefix else name


class HeadBlock(nn.Module):
    """The final norm and the LM head as a one-group block, so that a method quantizes the head with
    the code it quantizes decoder blocks with. The head sits under the last part of its name, so
    ``qualified(prefix, name)`` gives its real name. Calibrated on the final norm's inputs; a scale
    a method folds lands in the model's own final norm (this module holds it, not a copy)."""

    NORM = "final_norm"

    def __init__(self, norm: nn.Module, head: nn.Linear, head_name: str):
        super().__init__()
        self.prefix, _, self.head_local = head_name.rpartition(".")
        setattr(self, self.NORM, norm)
        setattr(self, self.head_local, head)
        self.group = LinearGroup(linears=(self.head_local,), norm=self.NORM, role="lm_head")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_local)(getattr(self, self.NORM)(hidden))


class QuantMethod:
    """Base class of every method. Subclasses set ``name``, ``config_class`` and ``quantize_groups``.

    Built once, by ``registry.build_method``, with everything a run needs: the config, the family
    adapter, the model's config, the dtype of stored scales and (for methods that need one) the
    builder of the quantized modules they leave in the block."""

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""  # how the model card names the method (empty: `name`)
    config_class: ClassVar[type[WeightOnlyConfig]] = WeightOnlyConfig
    needs_calibration: ClassVar[bool] = False
    # Whether the method can quantize routed experts (mixture-of-experts layers). None: weight-only
    # methods can, other methods must say so (a method folding scales or rotations into a norm must
    # fold them into every reader of it: the router and every expert; the weight-activation methods
    # do, weight_activation.py). A method that cannot is refused before any work.
    supports_experts: ClassVar[bool | None] = None
    # Whether the pipeline may let the method's passes over a block reuse the outputs of linears that
    # did not change since the previous pass (``BlockCalibration.reusing_linear_outputs``), including
    # the pass that carries the quantized outputs to the next block. Only for a method that changes
    # nothing in a block but linear weights and reports each change with ``calib.linears_changed``.
    reuses_linear_outputs: ClassVar[bool] = False

    def __init__(self, config: WeightOnlyConfig, adapter: FamilyAdapter, model_config: Any, *,
                 scale_dtype: torch.dtype = torch.float32,
                 quantized_linear: QuantizedLinearBuilder | None = None):
        self.config = config
        self.adapter = adapter
        self.model_config = model_config
        self.scale_dtype = scale_dtype
        self.quantized_linear = quantized_linear
        # Layers that had to fall back to another scheme (recorded as module_overrides on disk).
        self.overrides: dict[str, dict[str, Any]] = {}
        # Layers quantized without the method's calibration (full name -> why), e.g. an expert the
        # router sent no calibration token to, which falls back to RTN: for the run's report.
        self.calibration_fallbacks: dict[str, str] = {}
        if adapter.has_experts and not self.handles_experts():
            raise ConfigError(
                f"method {self.name} does not support mixture-of-experts layers yet "
                f"({adapter.display_name or adapter.name} models route tokens to experts)",
                hint="use a method that quantizes experts for this model: rtn, gptq, awq (weight-only) or "
                "rtn-wa, smoothquant, quarot, duquant (weight-activation)",
            )

    @classmethod
    def handles_experts(cls) -> bool:
        if cls.supports_experts is not None:
            return cls.supports_experts
        return not issubclass(cls.config_class, WeightActivationConfig)

    def fall_back_to_rtn(self, linear: nn.Linear, full_name: str, scheme: WeightScheme, reason: str) -> QuantizedWeight:
        """Quantize ``linear`` with round-to-nearest (no calibration), leave it computing with the
        result and record why (``calibration_fallbacks``)."""
        qweight = quantize_rtn(linear.weight.data, scheme, self.scale_dtype, bias=linear.bias)
        self.load_quantized(linear, qweight)
        self.calibration_fallbacks[full_name] = f"rtn: {reason}"
        return qweight

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
        """Quantize every linear of a decoder block (its groups as the adapter resolves them for this
        block: experts expanded); returns them by full name."""
        return self.quantize_groups(block, prefix, self.adapter.block_groups(block), calib)

    def quantize_head(
        self, norm: nn.Module, head: nn.Linear, name: str, calib: BlockCalibration | None
    ) -> QuantizedWeight:
        """Quantize the LM head ``name`` (read through the final ``norm``); ``calib`` holds the final
        norm's inputs for methods that need calibration."""
        block = HeadBlock(norm, head, name)
        return self.quantize_groups(block, block.prefix, (block.group,), calib)[name]

    def quantize_groups(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, QuantizedWeight]:
        """The algorithm: quantize the linears of ``groups`` (names relative to ``block``, which is
        called ``prefix`` in the model), leaving ``block`` computing as the quantized block will;
        results keyed by full name (:func:`qualified`)."""
        raise NotImplementedError

    @staticmethod
    def load_quantized(linear: nn.Linear, qweight: QuantizedWeight) -> None:
        """Make ``linear`` compute with the dequantized weight (so later blocks see quantized outputs)."""
        linear.weight.data = qweight.dequantize(linear.weight.dtype).to(linear.weight.device)
