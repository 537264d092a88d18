"""LLaDA configuration (remote code, written for qdlm-export).

The keys are those of the public ``GSAI-ML/LLaDA-8B-Base`` config.json, which keeps the OLMo names
(``d_model``, ``n_heads``, ``n_layers``, ``mlp_hidden_size``, ``weight_tying``...). The defaults
here are that checkpoint's values, so ``LLaDAConfig()`` describes LLaDA-8B. Many keys are training
options of the original OLMo code; they are kept so that a public config.json round-trips, and the
model rejects the values it does not implement instead of silently ignoring them.
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    # The standard names other tools look for, mapped onto the OLMo names this checkpoint uses.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        n_layers=32,
        mlp_ratio=4,
        mlp_hidden_size=12288,
        activation_type="silu",
        block_type="llama",
        block_group_size=1,
        alibi=False,
        alibi_bias_max=8.0,
        rope=True,
        rope_full_precision=True,
        rope_theta=500000.0,
        flash_attention=False,
        attention_dropout=0.0,
        multi_query_attention=None,
        attention_layer_norm=False,
        attention_layer_norm_with_affine=True,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        input_emb_norm=False,
        layer_norm_type="rms",
        layer_norm_with_affine=True,
        rms_norm_eps=1e-5,
        bias_for_layer_norm=False,
        include_bias=False,
        include_qkv_bias=False,
        scale_logits=False,
        vocab_size=126464,
        embedding_size=126464,
        weight_tying=False,
        max_sequence_length=4096,
        eos_token_id=126081,
        pad_token_id=126081,
        mask_token_id=126336,
        init_device="meta",
        init_fn="mitchell",
        init_std=0.02,
        init_cutoff_factor=None,
        precision="amp_bf16",
        use_cache=False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size
        self.activation_type = activation_type
        self.block_type = block_type
        self.block_group_size = block_group_size
        self.alibi = alibi
        self.alibi_bias_max = alibi_bias_max
        self.rope = rope
        self.rope_full_precision = rope_full_precision
        self.rope_theta = rope_theta
        self.flash_attention = flash_attention
        self.attention_dropout = attention_dropout
        self.multi_query_attention = multi_query_attention
        self.attention_layer_norm = attention_layer_norm
        self.attention_layer_norm_with_affine = attention_layer_norm_with_affine
        self.residual_dropout = residual_dropout
        self.embedding_dropout = embedding_dropout
        self.input_emb_norm = input_emb_norm
        self.layer_norm_type = layer_norm_type
        self.layer_norm_with_affine = layer_norm_with_affine
        self.rms_norm_eps = rms_norm_eps
        self.bias_for_layer_norm = bias_for_layer_norm
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.scale_logits = scale_logits
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.weight_tying = weight_tying
        self.max_sequence_length = max_sequence_length
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.init_device = init_device
        self.init_fn = init_fn
        self.init_std = init_std
        self.init_cutoff_factor = init_cutoff_factor
        self.precision = precision
        # Set before the base init: transformers 5 drops generation keys such as use_cache from kwargs.
        self.use_cache = use_cache
        super().__init__(**kwargs)

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads`` None means plain multi-head attention, as in OLMo)."""
        if self.n_kv_heads is None:
            return 1 if self.multi_query_attention else self.n_heads
        return self.n_kv_heads

    @property
    def effective_mlp_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model
