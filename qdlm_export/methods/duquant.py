"""DuQuant (Lin et al., 2024): smoothing, then rotations and a permutation learned from the
activations, so that outliers are spread within blocks and balanced across them.

For each group of linears sharing an input (so ``k``/``v`` use ``q``'s transform and ``up`` uses
``gate``'s, as in the study), in the paper's order:

1. **Smoothing** as SmoothQuant (alpha 0.5), folded into the norm / previous linear where exact,
   online (``input_smooth``) otherwise (Dream's ``v -> o`` under GQA).
2. **Rotation 1**: block-diagonal, ``block_size`` channels per block. Greedy, on calibration tokens
   of the smoothed input: find the channel holding the largest magnitude and rotate it with
   ``R_c = E_c R E_c`` -- ``R`` an orthogonal matrix whose first row is uniform (so channel 0 is
   spread evenly over the block; ``R = diag(1, Q') H(b)`` with a random orthogonal ``Q'``), ``E_c``
   swapping channels 0 and ``c``. Repeat up to ``max_rotation_steps`` times and keep the prefix of
   steps that gave the smallest range (max - min) of the block.
3. **Zig-zag permutation**: channels sorted by ``max|x|`` are dealt to the blocks in a zig-zag
   (0, 1, ..., n-1, n-1, ..., 0, 0, 1, ...), so every block gets a similar share of large ones.
4. **Rotation 2**: step 2 again on the permuted input.

The input seen by the quantizer is ``x / s -> blocks @ R1 -> [perm] -> blocks @ R2``; the stored
weight is ``(W diag(s)) R1 P R2`` (``transforms.transform_weight``), quantized per output channel
with its range shrunk by ``swc``; activations are quantized per token, their range shrunk by
``lac`` (``act_clip_ratio``). Each linear stores ``input_rotation_1``, ``input_permutation``,
``input_rotation_2`` (and ``input_smooth`` if online).

Like the public code, one rotation is shared by all blocks of a linear (``[1, b, b]``) by default;
``per_block_rotation`` learns one per block (``[in/b, b, b]``). The public code searches on each
layer's *mean* calibration input; here it runs on up to ``rotation_tokens`` calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..core.hadamard import hadamard_matrix, hadamard_unsupported_reason
from ..core.transforms import apply_op
from ..errors import ConfigError
from ..families import LinearGroup
from .base import BlockCalibration, find_linear
from .registry import register_method
from .smoothquant import smooth_block
from .weight_activation import LinearPlan, MoEWeightActivationConfig, WeightActivationMethod


@dataclass(frozen=True)
class DuQuantConfig(MoEWeightActivationConfig):
    """DuQuant with the study's settings: W4A4, per-channel asymmetric weights clipped to 0.8,
    per-token asymmetric activations clipped to 0.9, block 128, 256 greedy steps."""

    method: ClassVar[str] = "duquant"

    bits: int = 4
    group_size: int = -1
    symmetric: bool = False
    act_bits: int = 4
    act_symmetric: bool = False
    act_clip_ratio: float = 0.9  # the study's --lac
    alpha: float = 0.5  # smoothing strength
    block_size: int = 128
    max_rotation_steps: int = 256
    swc: float = 0.8  # weight clip ratio (the study's --swc)
    w_clip: bool = False  # instead of swc, search each row's clip against the calibration inputs
    rotation_tokens: int = 512  # calibration tokens per group the greedy search runs on
    per_block_rotation: bool = False  # False: one rotation shared by all blocks of a linear
    fold_smoothing: bool = True  # False: keep every smoothing vector online (input_smooth)
    rotation_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha {self.alpha} must be in [0, 1]", hint="--alpha accepts a number from 0 to 1; the study uses 0.5")
        reason = hadamard_unsupported_reason(self.block_size) if self.block_size > 1 else "it must be above 1"
        if reason is not None:
            raise ConfigError(
                f"DuQuant block size {self.block_size} (-O block_size=) is invalid: it must be a Hadamard size "
                f"({reason})",
                hint="use a size such as 64 or 128 (the study uses 128)",
            )
        if self.max_rotation_steps < 0:
            raise ConfigError(
                f"-O max_rotation_steps={self.max_rotation_steps} must be non-negative",
                hint="-O max_rotation_steps accepts an integer >= 0 (0: no greedy rotation)",
            )
        if not 0.0 < self.swc <= 1.0:
            raise ConfigError(
                f"-O swc={self.swc} (the weight clip ratio) must be in (0, 1]",
                hint="-O swc accepts a number above 0 and at most 1 (1: no clipping)",
            )
        if self.rotation_tokens <= 0:
            raise ConfigError(
                f"-O rotation_tokens={self.rotation_tokens} must be positive",
                hint="-O rotation_tokens accepts an integer >= 1",
            )


def base_rotation(block: int, seed: int) -> torch.Tensor:
    """``diag(1, Q') H(b)``: orthogonal, first row uniform (spreads channel 0 over the block)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(block - 1, block - 1, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    mix = torch.eye(block, dtype=torch.float64)
    mix[1:, 1:] = q
    return mix @ hadamard_matrix(block)


def _range(xb: torch.Tensor) -> torch.Tensor:
    """max - min over each block's tokens and channels: ``[k, T, b] -> [k]``."""
    flat = xb.reshape(xb.shape[0], -1)
    return flat.amax(-1) - flat.amin(-1)


@torch.no_grad()
def greedy_rotation(x: torch.Tensor, block: int, steps: int, rot: torch.Tensor, per_block: bool) -> torch.Tensor:
    """Greedy block rotation of ``x [T, d]``: ``[1, b, b]`` shared, or ``[d/b, b, b]`` per block.

    The search runs in float32; the kept product of steps is re-orthogonalised (its polar factor,
    in float64) so that ``transform_weight``'s ``R^-T = R`` holds to float32 precision.
    """
    T, d = x.shape
    nb = d // block
    x = x.to(torch.float32)
    xb = x.reshape(T, nb, block).transpose(0, 1) if per_block else x.reshape(1, T * nb, block)
    k = xb.shape[0]
    rot = rot.to(device=x.device, dtype=torch.float32)
    acc = torch.eye(block, dtype=torch.float32, device=x.device).repeat(k, 1, 1)
    best = acc.clone()
    best_range = _range(xb)
    base_idx = torch.arange(block, device=x.device).repeat(k, 1)
    rows = torch.arange(k, device=x.device)
    for _ in range(steps):
        channel = xb.abs().reshape(k, -1).argmax(-1) % block  # where each block's outlier sits
        idx = base_idx.clone()
        idx[rows, 0] = channel
        idx[rows, channel] = 0  # E_c: swap channels 0 and c
        R = rot[idx[:, :, None], idx[:, None, :]]  # E_c R E_c, per block
        xb = torch.bmm(xb, R)
        acc = torch.bmm(acc, R)
        rng = _range(xb)
        better = rng < best_range
        best[better] = acc[better]
        best_range = torch.where(better, rng, best_range)
    u, _, vh = torch.linalg.svd(best.double())
    return (u @ vh).to(torch.float32)


def zigzag_permutation(x: torch.Tensor, block: int) -> torch.Tensor:
    """Channel order dealing channels (largest ``max|x|`` first) to blocks in a zig-zag, each block
    then sorted by decreasing magnitude; ``x[..., perm]`` is the permuted input."""
    d = x.shape[-1]
    nb = d // block
    magnitude = x.abs().reshape(-1, d).amax(0)
    order = torch.argsort(magnitude, descending=True, stable=True).tolist()
    bins: list[list[int]] = [[] for _ in range(nb)]
    cur, step = 0, 1
    for channel in order:
        bins[cur].append(channel)
        nxt = cur + step
        if nxt < 0 or nxt >= nb:  # bounce, staying on the end block once
            step = -step
        else:
            cur = nxt
    return torch.tensor([c for b in bins for c in b], dtype=torch.int64)


def duquant_transform(
    x: torch.Tensor, block: int, steps: int, rot: torch.Tensor, per_block: bool
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Rotation 1, zig-zag permutation, rotation 2, learned on the (smoothed) tokens ``x [T, in]``."""
    blocks = x.shape[-1] // block if per_block else 1
    ops = [
        {"op": "block_rotation", "tensor": "input_rotation_1", "block_size": block, "blocks": blocks},
        {"op": "permute", "tensor": "input_permutation"},
        {"op": "block_rotation", "tensor": "input_rotation_2", "block_size": block, "blocks": blocks},
    ]
    tensors: dict[str, torch.Tensor] = {}
    tensors["input_rotation_1"] = greedy_rotation(x, block, steps, rot, per_block)
    x = apply_op(x.float(), ops[0], tensors)
    tensors["input_permutation"] = zigzag_permutation(x, block)
    x = apply_op(x, ops[1], tensors)
    tensors["input_rotation_2"] = greedy_rotation(x, block, steps, rot, per_block)
    return ops, {k: v.cpu() for k, v in tensors.items()}


@register_method
class DuQuant(WeightActivationMethod):
    display_name = "DuQuant"
    name = "duquant"
    config_class = DuQuantConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Fail before any calibration work when the block size cannot tile the residual stream or the
        # MLP's width (every input size is checked again per block, in plan_block).
        hidden = self.adapter.attention_shape(self.model_config).hidden_size
        text = self.adapter.text_config(self.model_config)
        inter = next((v for k in self.adapter.intermediate_size_keys
                      if isinstance(v := (text.get(k) if isinstance(text, dict) else getattr(text, k, None)), int)),
                     None)
        for size, what in ((hidden, "hidden size"), (inter, "intermediate (MLP) size")):
            if size is not None and size % self.config.block_size:
                raise ConfigError(
                    f"DuQuant block size {self.config.block_size} does not divide the model's {what} {size}",
                    hint="pass -O block_size=N with N dividing every linear's input size (the study uses 128)",
                )
        self.rot = base_rotation(self.config.block_size, self.config.rotation_seed)
        self.online_smoothing: list[str] = []

    def method_needs_calibration(self) -> bool:
        return True

    def weight_clip_ratio(self, full_name: str) -> float:
        return self.config.swc

    @torch.no_grad()
    def plan_block(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, LinearPlan]:
        if calib is None or len(calib) == 0:
            raise ValueError("DuQuant needs calibration inputs for every block")
        cfg: DuQuantConfig = self.config  # type: ignore[assignment]
        for group in groups:
            in_features = find_linear(block, group.linears[0]).in_features
            if in_features % cfg.block_size:
                raise ConfigError(
                    f"DuQuant block size {cfg.block_size} does not divide the input size {in_features} of "
                    f"{prefix}.{group.linears[0]}",
                    hint="pass -O block_size=N with N dividing every linear's input size (the study uses 128)",
                )
        inputs = self.block_inputs(block, prefix, groups, calib, sample_tokens=cfg.rotation_tokens)
        smoothed = smooth_block(block, groups, inputs, cfg.alpha, fold=cfg.fold_smoothing, adapter=self.adapter,
                                model_config=self.model_config)
        plans = {}
        # Groups with the same input tokens and scale (every expert's gate/up under all-token
        # calibration) get the same rotations: learned once.
        learned: dict[tuple[int, int], tuple[list, dict]] = {}
        for group in groups:
            s, smooth_plan = smoothed[group]
            stats = inputs.stats[group]
            key = (id(stats), id(s))
            if key not in learned:
                tokens = stats.tokens().to(s.device) / s[None, :]  # what the rotations will see
                learned[key] = duquant_transform(tokens, cfg.block_size, cfg.max_rotation_steps, self.rot,
                                                 cfg.per_block_rotation)
            ops, tensors = learned[key]
            plan = LinearPlan(ops=smooth_plan.ops + ops, tensors={**smooth_plan.tensors, **tensors})
            for name in group.linears:
                plans[name] = plan
                if smooth_plan.ops:
                    self.online_smoothing.append(f"{prefix}.{name}")
        return plans

    def transform_metadata(self) -> dict[str, Any]:
        cfg: DuQuantConfig = self.config  # type: ignore[assignment]
        return {
            "offline": {
                "kind": "duquant",
                "alpha": cfg.alpha,
                "smoothing_folded": cfg.fold_smoothing,
                "online_smoothing": list(self.online_smoothing),
                "block_size": cfg.block_size,
                "max_rotation_steps": cfg.max_rotation_steps,
                "shared_by_group": "linears reading the same input share one transform (k, v use q's; up uses gate's)",
                "weights_stored_as": "W diag(s) R1 P R2",
            }
        }
