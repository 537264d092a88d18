"""QuaRot (Ashkboos et al., 2024): rotate the residual stream so no channel stands out, then quantize.

An orthogonal ``Q`` applied to every vector of the residual stream changes nothing the network
computes, provided every reader of the stream sees ``W Q`` instead of ``W`` and every writer writes
``Q^T W``; RMSNorm commutes with ``Q`` once its gain has been moved into the readers. After the
rotation the few huge channels of LLMs are spread over all channels, so per-token quantization
of the readers' inputs loses little. In the paper's order:

Offline (fused into the stored weights):
  * fold every RMSNorm gain into the linears that read it (the final norm into the LM head) and
    set the gains to 1;
  * optionally centre the embeddings (``center_embeddings``; see below);
  * ``Q = D H(hidden)``, a Hadamard matrix with a random +-1 diagonal ``D`` (``rotation_seed``):
    embeddings ``E Q``; readers (q/k/v, gate/up, LM head) ``W Q``; writers (attention output,
    down projection) ``Q^T W`` (and their biases);
  * per head, ``H(head_dim)`` on the value projection's outputs and the attention output's inputs
    (attention mixes tokens, not channels, so a per-head rotation of ``v`` passes through it).

Online (recorded per module, applied by the loader):
  * the attention output's input: a Hadamard over heads (``size = num_heads``, ``stride =
    head_dim``); with the per-head part already in the weights, the input sees ``H(heads) (x)
    H(head_dim)``;
  * the down projection's input: a full ``H(intermediate)`` (the SiLU gate in between stops it from
    being folded into ``up``): LLaDA's 12288 = 12 * 1024, Dream's 18944 = 148 * 128 and Llama-2's
    11008 = 172 * 64 use the non-power-of-two matrices of ``qdlm_export/hadamard.py``.

Families whose blocks normalise what they add to the residual stream (Gemma's post-norms with gains,
``FamilyAdapter.residual_post_norms``) cannot have the stream rotated: ``norm(o_proj(x) Q)`` is not
``norm(o_proj(x)) Q`` once the norm has a per-channel gain. There every quantized linear's input is
rotated online instead, ``x H(in) -> W H(in)``, the treatment the paper gives the down projection; the
norms, the embeddings and the (tied) LM head are left as they are, and a per-head norm between a
projection and attention (``q_norm``/``k_norm``, ``v_norm``) is never crossed by a rotation.

Weights: GPTQ on the rotated weights with the rotated inputs' Hessians (the study), or RTN;
activations per token, symmetric. QuaRot's extra Hadamard on queries and keys after RoPE only
matters for a quantized K cache, which dLLMs do not have; ``qkv_bits`` instead quantizes the q/k/v
projection outputs per token before RoPE (an approximation, see docs/FORMAT.md).

Centring the embeddings (the study's QuaRot does it) removes each token embedding's mean. That is
exact for LayerNorm models but *changes* RMSNorm models such as LLaDA and Dream (RMSNorm does not
subtract the mean), so it is off by default here: with it off, the rotated model computes exactly
what the original does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..core.hadamard import hadamard_unsupported_reason
from ..core.transforms import random_hadamard_signs
from ..errors import ConfigError
from ..families import LinearGroup
from .base import BlockCalibration, find_linear
from .folding import (fold_norm_gain, hadamard_per_head, is_scale_only_norm, rotate_columns, rotate_outputs,
                      rotate_value_rows)
from .registry import register_method
from .shared_inputs import norm_readers, router_of, value_rows
from .weight_activation import WEIGHT_METHODS, LinearPlan, MoEWeightActivationConfig, WeightActivationMethod


@dataclass(frozen=True)
class QuaRotConfig(MoEWeightActivationConfig):
    """QuaRot with the study's settings: W4A4, per-channel symmetric GPTQ weights with a clip
    search, per-token symmetric activations."""

    method: ClassVar[str] = "quarot"

    bits: int = 4
    group_size: int = -1
    act_bits: int = 4
    rotation_seed: int = 0
    weight_method: str = "gptq"  # "gptq" (the study) or "rtn"
    damp: float = 0.01  # GPTQ dampening
    w_clip: bool = True  # GPTQ: search each row's clipping range (the study's --w_clip)
    center_embeddings: bool = False  # the study centres; not function-preserving under RMSNorm

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_method not in WEIGHT_METHODS:
            raise ConfigError(
                f"-O weight_method={self.weight_method} is invalid", hint=f"choose one of {', '.join(WEIGHT_METHODS)}"
            )
        if self.damp < 0:
            raise ConfigError(f"--damp {self.damp} must be non-negative", hint="--damp accepts a finite number >= 0, such as 0.01")


# Config keys of the MLP width (Dream/Qwen2/Llama; LLaDA), for the early Hadamard size check.
INTERMEDIATE_SIZE_KEYS = ("intermediate_size", "mlp_hidden_size")
_SIZES_HINT = ("supported sizes are 2^k and m * 2^k with m = 4 * odd a Paley order (12, 20, 28, 36, 44, 52, 60, "
               "108, 140, 148, ...) or a Williamson one (92, 116, 156, 172); docs/FORMAT.md lists the rule. Use "
               "smoothquant or duquant for this model")


def _require_hadamard(size: int, what: str) -> None:
    """ConfigError naming the size and the nearest supported ones when the format has no H(size)."""
    reason = hadamard_unsupported_reason(size)
    if reason is not None:
        raise ConfigError(f"QuaRot needs a Hadamard matrix of {what} {size}, and this format has none: {reason}",
                          hint=_SIZES_HINT)


def _config_value(config: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if value is not None:
            return value
    return None


def _fold_norm(norm: nn.Module, linears: list[nn.Module], where: str) -> None:
    if not is_scale_only_norm(norm):
        raise ConfigError(
            f"QuaRot folds norm gains into the next linears, but {where} is not a bias-free scaled norm",
            hint="QuaRot supports RMSNorm-style norms (LLaDA, Dream, Llama, Qwen2)",
        )
    fold_norm_gain(norm, linears)


def residual_writers(groups: tuple[LinearGroup, ...]) -> set[str]:
    """Linears whose output is added to the residual stream: those of a group fed by a previous
    linear (not by a norm) that feed no further group -- the attention output, every down
    projection (each routed expert's and the shared expert's included). Decided from the groups'
    links, not their order: a block's expert templates are expanded template by template."""
    feeders = {group.prev_linear for group in groups if group.prev_linear}
    return {name for group in groups if group.norm is None for name in group.linears if name not in feeders}


@register_method
class QuaRot(WeightActivationMethod):
    display_name = "QuaRot"
    name = "quarot"
    config_class = QuaRotConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shape = self.adapter.attention_shape(self.model_config)
        # Post-norms on the residual writers: every input rotated online, the stream left alone.
        self.online_only = bool(self.adapter.residual_post_norms)
        if self.online_only:
            _require_hadamard(self.shape.hidden_size, "the model's hidden size")
            return
        hidden, heads, head_dim = self.shape.hidden_size, self.shape.num_heads, self.shape.head_dim
        for size, what in ((hidden, "hidden size"), (heads, "number of attention heads"), (head_dim, "head dim")):
            _require_hadamard(size, f"the model's {what}")
        # The down projection's online Hadamard: checked here too, so that a model without one fails
        # before any calibration work (plan_block checks every linear's real size again).
        inter = _config_value(self.model_config, INTERMEDIATE_SIZE_KEYS)
        if isinstance(inter, int):
            _require_hadamard(inter, "the model's intermediate (MLP) size")
        self.signs = random_hadamard_signs(hidden, self.config.rotation_seed)

    def prepare(self, model: nn.Module) -> None:
        """Embeddings, final norm and LM head: fold, (centre), rotate."""
        if self.online_only:
            return  # the residual stream is not rotated: embeddings, final norm and head stay as they are
        adapter = self.adapter
        embed = model.get_submodule(adapter.embeddings)
        head = model.get_submodule(adapter.lm_head)
        if adapter.ties_embeddings(self.model_config) or head.weight is embed.weight:
            raise ConfigError(
                "QuaRot needs an LM head separate from the input embeddings (they are rotated differently), "
                "and this model ties them",
                hint="use smoothquant or duquant for this model",
            )
        with torch.no_grad():
            _fold_norm(model.get_submodule(adapter.final_norm), [head], adapter.final_norm)
            if self.config.center_embeddings:
                w = embed.weight.data.double()
                embed.weight.data = (w - w.mean(-1, keepdim=True)).to(embed.weight.dtype)
            embed.weight.data = rotate_columns(embed.weight.data, self.signs)
            head.weight.data = rotate_columns(head.weight.data, self.signs)

    @torch.no_grad()
    def plan_block(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, LinearPlan]:
        if self.online_only:
            return self._plan_online(block, prefix, groups)
        heads, head_dim = self.shape.num_heads, self.shape.head_dim
        writers = residual_writers(groups)
        router = router_of(self.adapter, block, groups)
        plans: dict[str, LinearPlan] = {}
        rotated_norms: set[str] = set()
        for group in groups:
            linears = [find_linear(block, name) for name in group.linears]
            if group.norm is not None and group.norm not in rotated_norms:
                # Readers of the residual stream: every group reading this norm at once, and the
                # full-precision router (it keeps computing the same logits from the rotated stream).
                rotated_norms.add(group.norm)
                readers, extra = norm_readers(block, groups, group.norm, router)
                _fold_norm(block.get_submodule(group.norm), readers + extra, f"{prefix}.{group.norm}")
                for reader in readers + extra:
                    reader.weight.data = rotate_columns(reader.weight.data, self.signs)
            if group.role == "attn_out":
                # Per head on v's outputs (offline: the v rows of a fused q/k/v linear) and o's inputs
                # (offline part), heads online.
                rows = value_rows(self.adapter, self.model_config, groups, group.prev_linear)
                rotate_value_rows(find_linear(block, group.prev_linear), head_dim, rows)
                for name, linear in zip(group.linears, linears):
                    linear.weight.data = hadamard_per_head(linear.weight.data, head_dim)
                    plans[name] = LinearPlan(ops=[{"op": "hadamard", "size": heads, "stride": head_dim}])
            elif group.norm is None:
                # e.g. the down projection: nonlinear gating in front, so the whole rotation is online.
                for name, linear in zip(group.linears, linears):
                    _require_hadamard(linear.in_features, f"{prefix}.{name}'s input size")
                    plans[name] = LinearPlan(ops=[{"op": "hadamard", "size": linear.in_features, "stride": 1}])
            for name, linear in zip(group.linears, linears):
                if name in writers:
                    rotate_outputs(linear, self.signs)
        return plans

    def _plan_online(self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...]) -> dict[str, LinearPlan]:
        """Every linear's input rotated online by H(in_features); nothing folded into the block."""
        plans: dict[str, LinearPlan] = {}
        for group in groups:
            for name in group.linears:
                linear = find_linear(block, name)
                _require_hadamard(linear.in_features, f"{prefix}.{name}'s input size")
                plans[name] = LinearPlan(ops=[{"op": "hadamard", "size": linear.in_features, "stride": 1}])
        return plans

    def transform_metadata(self) -> dict[str, Any]:
        if self.online_only:
            return {"offline": {"kind": "quarot", "rotation": "online-hadamard", "residual_rotated": False,
                                "why": "post-norms with gains on the residual writers (residual_post_norms)"}}
        return {
            "offline": {
                "kind": "quarot",
                "rotation": "random-hadamard",
                "rotation_seed": self.config.rotation_seed,
                "hidden_size": self.shape.hidden_size,
                "norms_folded": True,
                "center_embeddings": self.config.center_embeddings,
                "per_head_value_hadamard": self.shape.head_dim,
            }
        }
