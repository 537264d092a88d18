"""LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct): OLMo-style remote code, bidirectional, full MHA, no biases.

``ff_out`` names both each block's down projection (``...blocks.{i}.ff_out``) and the LM head
(``model.transformer.ff_out``); adapters always use full paths, so the two never mix.
"""

from .base import FamilyAdapter, LinearGroup
from .registry import register_family

LLADA = register_family(
    FamilyAdapter(
        name="llada",
        display_name="LLaDA",
        model_types=("llada",),
        blocks="model.transformer.blocks",
        groups=(
            LinearGroup(("q_proj", "k_proj", "v_proj"), norm="attn_norm", role="qkv"),
            LinearGroup(("attn_out",), prev_linear="v_proj", role="attn_out"),
            LinearGroup(("ff_proj", "up_proj"), norm="ff_norm", role="gate_up"),
            LinearGroup(("ff_out",), prev_linear="up_proj", role="down"),
        ),
        embeddings="model.transformer.wte",
        final_norm="model.transformer.ln_f",
        lm_head="model.transformer.ff_out",
        hidden_size_keys=("d_model",),
        num_heads_keys=("n_heads",),
        num_kv_heads_keys=("n_kv_heads",),
        head_dim_keys=(),
        num_layers_keys=("n_layers",),
        tie_keys=("weight_tying",),
        default_mask_token_id=126336,
        logits_shift=False,
        needs_remote_code=True,
        auto_class="AutoModel",
    )
)
