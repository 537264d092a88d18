"""LLaDA2.0 / LLaDA2.1 (inclusionAI, ``model_type: llada2_moe``): block-diffusion mixture of experts.

Layers ``model.layers.N``: one fused q/k/v linear (``attention.query_key_value``, rows q | k | v) and
``attention.dense``; the MLP is dense (``mlp.{gate,up,down}_proj``) in the first
``first_k_dense_replace`` layers and sparse after them: the router ``mlp.gate`` (grouped top-k, kept
in full precision), ``mlp.experts.E.{gate,up,down}_proj`` and ``mlp.shared_experts.{gate,up,down}_proj``.
Embeddings are ``model.word_embeddings``. The mask token id is the sampler's default, 156895.
"""

from .base import ExpertDispatch, FamilyAdapter, LinearGroup
from .registry import register_family

_NORM = "post_attention_layernorm"

LLADA2_MOE = register_family(
    FamilyAdapter(
        name="llada2_moe",
        display_name="LLaDA2",
        model_types=("llada2_moe",),
        blocks="model.layers",
        groups=(
            LinearGroup(("attention.query_key_value",), norm="input_layernorm", role="qkv", row_split=("q", "k", "v")),
            LinearGroup(("attention.dense",), prev_linear="attention.query_key_value", role="attn_out"),
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), norm=_NORM, role="gate_up", optional=True),
            LinearGroup(("mlp.down_proj",), prev_linear="mlp.up_proj", role="down", optional=True),
            LinearGroup(("gate_proj", "up_proj"), norm=_NORM, role="expert_gate_up", experts="mlp.experts"),
            LinearGroup(("down_proj",), prev_linear="up_proj", role="expert_down", experts="mlp.experts"),
            LinearGroup(("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"), norm=_NORM,
                        role="shared_gate_up", optional=True),
            LinearGroup(("mlp.shared_experts.down_proj",), prev_linear="mlp.shared_experts.up_proj",
                        role="shared_down", optional=True),
        ),
        embeddings="model.word_embeddings",
        final_norm="model.norm",
        lm_head="lm_head",
        router="mlp.gate",
        expert_dispatch=ExpertDispatch(module="mlp", method="moe_infer"),
        default_mask_token_id=156895,
        block_length=32,  # its generate()'s default
        logits_shift=False,
        needs_remote_code=True,
        auto_class="AutoModelForCausalLM",
    )
)
