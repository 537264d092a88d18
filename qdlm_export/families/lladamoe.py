"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct; ``model_type: lladamoe``): the
mixture-of-experts sibling of LLaDA-8B, an OLMoE-style decoder run bidirectionally.

Layers ``model.layers.N``: ``self_attn.{q,k,v,o}_proj`` (with per-head ``q_norm``/``k_norm``); the MLP
is dense (``mlp.{gate,up,down}_proj``) where ``moe_layer_freq`` is 0 and sparse elsewhere: the router
``mlp.gate`` (a linear kept in full precision) and ``mlp.experts.E.{gate,up,down}_proj``; an optional
``shared_expert.{gate,up,down}_proj`` sits beside ``mlp`` in the layer. The mask token id is 156895.
"""

from .base import ExpertDispatch, ExpertRouting, FamilyAdapter, LinearGroup
from .registry import register_family

_NORM = "post_attention_layernorm"

LLADAMOE = register_family(
    FamilyAdapter(
        name="lladamoe",
        display_name="LLaDA-MoE",
        model_types=("lladamoe",),
        blocks="model.layers",
        groups=(
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm="input_layernorm", role="qkv"),
            LinearGroup(("self_attn.o_proj",), prev_linear="self_attn.v_proj", role="attn_out"),
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), norm=_NORM, role="gate_up", optional=True),
            LinearGroup(("mlp.down_proj",), prev_linear="mlp.up_proj", role="down", optional=True),
            LinearGroup(("gate_proj", "up_proj"), norm=_NORM, role="expert_gate_up", experts="mlp.experts"),
            LinearGroup(("down_proj",), prev_linear="up_proj", role="expert_down", experts="mlp.experts"),
            LinearGroup(("shared_expert.gate_proj", "shared_expert.up_proj"), norm=_NORM,
                        role="shared_gate_up", optional=True),
            LinearGroup(("shared_expert.down_proj",), prev_linear="shared_expert.up_proj",
                        role="shared_down", optional=True),
        ),
        embeddings="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        router="mlp.gate",
        expert_dispatch=ExpertDispatch(
            module="mlp",
            routing=ExpertRouting(router="gate", top_k="top_k", bias="expert_bias", normalize="norm_topk_prob"),
        ),
        intermediate_size_keys=("dense_intermediate_size",),
        default_mask_token_id=156895,
        logits_shift=False,
        needs_remote_code=True,
        auto_class="AutoModel",
    )
)
