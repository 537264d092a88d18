"""DiffusionGemma (Google, ``model_type: diffusion_gemma``, native in transformers >= 5.24): a
block-diffusion mixture of experts with two text stacks over one set of weights.

``DiffusionGemmaForBlockDiffusion`` (loaded with ``AutoModelForImageTextToText``): a causal encoder
``model.encoder.language_model`` writes the key/value cache of the clean context; the bidirectional
decoder ``model.decoder`` denoises a canvas of ``canvas_length`` tokens reading that cache. The two
stacks share every text weight (transformers ties them; checkpoints store them once, under the
decoder), so the decoder's layers are the blocks and the encoder is their :class:`SharedStack`.

Layers ``model.decoder.layers.N``:

* attention ``self_attn.{q,k,v,o}_proj`` with per-head ``q_norm``/``k_norm`` (gains) and ``v_norm``
  (no gain); full-attention layers (``layer_types``) have no ``v_proj`` (the keys are the values) and
  their own head size and key/value head count (``global_head_dim``, ``num_global_key_value_heads``).
  ``post_attention_layernorm`` normalises the attention *output* (a post-norm): no linear reads it.
  The weightless ``v_norm`` between ``v_proj`` and ``o_proj`` is not linear, so nothing folds across
  it: ``o_proj`` has no ``prev_linear``.
* a dense MLP ``mlp.{gate,up,down}_proj`` read through ``pre_feedforward_layernorm``;
* the router ``router`` (``proj``, ``scale``, ``per_expert_scale``) normalises the residual itself,
  not through the experts' norm; it stays in full precision;
* experts stored fused, ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I], read
  through ``pre_feedforward_layernorm_2`` (:class:`FusedExperts`).

The decoder's self-conditioning MLP (``model.decoder.self_conditioning``), the embeddings (the LM
head is tied to them; logits are soft-capped), the vision tower and its embedder stay in full
precision. There is no mask token: noise is uniformly random tokens.
"""

from .base import AttentionVariant, FamilyAdapter, FusedExperts, LinearGroup, SharedStack
from .registry import register_family

DIFFUSION_GEMMA = register_family(
    FamilyAdapter(
        name="diffusion_gemma",
        display_name="DiffusionGemma",
        model_types=("diffusion_gemma",),
        blocks="model.decoder.layers",
        groups=(
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm="input_layernorm",
                        role="qkv", optional_linears=("self_attn.v_proj",)),
            LinearGroup(("self_attn.o_proj",), role="attn_out"),
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), norm="pre_feedforward_layernorm", role="gate_up"),
            LinearGroup(("mlp.down_proj",), prev_linear="mlp.up_proj", role="down"),
            LinearGroup(("gate_proj", "up_proj"), norm="pre_feedforward_layernorm_2", role="expert_gate_up",
                        experts="experts"),
            LinearGroup(("down_proj",), prev_linear="up_proj", role="expert_down", experts="experts"),
        ),
        embeddings="model.decoder.embed_tokens",
        final_norm="model.decoder.norm",
        lm_head="lm_head",
        router="router",
        router_norm_shared=False,
        fused_experts=FusedExperts(),
        shared_stack=SharedStack(layers="model.encoder.language_model.layers",
                                 alias=("model.encoder.language_model.", "model.decoder.")),
        config_section="text_config",
        attention_variants=(AttentionVariant("full_attention", head_dim_keys=("global_head_dim",),
                                             num_kv_heads_keys=("num_global_key_value_heads",)),),
        intermediate_size_keys=("intermediate_size",),
        residual_post_norms=("post_attention_layernorm", "post_feedforward_layernorm_1",
                             "post_feedforward_layernorm_2", "post_feedforward_layernorm"),
        noise="uniform",
        logits_shift=False,
        needs_remote_code=False,
        auto_class="AutoModelForImageTextToText",
    )
)
