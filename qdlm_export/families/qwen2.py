"""The Qwen2/Llama decoder layout: Dream-7B (a bidirectional Qwen2.5-7B) and plain Llama/Qwen2/Mistral.

Dream shifts its logits (position i is predicted by the logits at i-1) and needs remote code; the
native families are ordinary causal LMs that transformers loads by itself.
"""

from dataclasses import replace

from .base import FamilyAdapter, LinearGroup
from .registry import register_family

_QWEN2_LAYOUT = FamilyAdapter(
    name="qwen2-layout",
    model_types=(),
    blocks="model.layers",
    groups=(
        LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm="input_layernorm", role="qkv"),
        LinearGroup(("self_attn.o_proj",), prev_linear="self_attn.v_proj", role="attn_out"),
        LinearGroup(("mlp.gate_proj", "mlp.up_proj"), norm="post_attention_layernorm", role="gate_up"),
        LinearGroup(("mlp.down_proj",), prev_linear="mlp.up_proj", role="down"),
    ),
    embeddings="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

DREAM = register_family(
    replace(
        _QWEN2_LAYOUT,
        name="dream",
        display_name="Dream",
        model_types=("Dream", "dream"),
        default_mask_token_id=151666,
        logits_shift=True,
        needs_remote_code=True,
        auto_class="AutoModel",
    )
)

# Causal decoders transformers loads natively: no mask token, not diffusion models, but the same
# linears, so every method applies to them unchanged.
DENSE_DECODER = register_family(
    replace(
        _QWEN2_LAYOUT,
        name="dense-decoder",
        model_types=("llama", "qwen2", "mistral"),
        is_diffusion=False,
        needs_remote_code=False,
        auto_class="AutoModelForCausalLM",
    )
)
