"""Dream modelling code (remote code, written for qdlm-export).

A compact re-implementation of what the public ``Dream-org/Dream-v0-Base-7B`` remote code computes:
the Qwen2 decoder (RMSNorm, q/k/v projections with bias, o_proj without, GQA, NeoX rotate-half
RoPE, SwiGLU MLP) run *bidirectionally* as a mask predictor. Module and parameter names are the
public ones:

    model.embed_tokens
    model.layers.{i}.input_layernorm
    model.layers.{i}.self_attn.{q,k,v,o}_proj
    model.layers.{i}.post_attention_layernorm
    model.layers.{i}.mlp.{gate,up,down}_proj
    model.norm
    lm_head

The logits are returned unshifted, exactly as the public model does: Dream was trained so that the
logits at position i-1 predict token i, and every caller shifts (``cat([l[:, :1], l[:, :-1]], 1)``).

Differences from the public code, all outside the released model's behaviour: no KV cache, no
sliding window, no flash-attention path, no ``diffusion_generate`` (qdlm-export has its own
sampler), and a 2-D padding ``attention_mask`` hides padded *keys* only (the public code also
blanks the padded query rows, which changes nothing at unpadded positions).
Every linear is called as a module so a quantizer can swap ``nn.Linear`` out.
"""


import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .configuration_dream import DreamConfig


class DreamRMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype before the gain (Qwen2/Llama)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class DreamRotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions, computed in fp32 and handed to every layer.

    The frequencies are recomputed per call instead of kept in a buffer: nothing to save and nothing
    to re-initialise after a meta-device load.
    """

    def __init__(self, config: DreamConfig):
        super().__init__()
        rope = getattr(config, "rope_parameters", None) or {}  # where transformers 5 puts rope_scaling
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"this Dream code implements plain RoPE only, got {rope}")
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.base = rope.get("rope_theta", config.rope_theta)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float) / dim))
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.is_causal = False  # the mask predictor sees the whole sequence
        h = config.hidden_size
        # Qwen2's layout: biases on q/k/v, none on the output projection.
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.num_key_value_groups > 1:  # GQA: kv head j serves query heads j*g .. j*g+g-1
            k = k.repeat_interleave(self.num_key_value_groups, dim=1)
            v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                **kwargs):
        # The public layer's signature and tuple return, so block-wise calibration code written
        # against these fixtures runs unchanged on the real model.
        if past_key_value is not None or use_cache:
            raise NotImplementedError("Dream has no KV cache")
        if position_embeddings is None:
            raise ValueError("DreamDecoderLayer needs position_embeddings=(cos, sin) from model.rotary_emb")
        x = hidden_states
        x = x + self.self_attn(self.input_layernorm(x), attention_mask, position_embeddings)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x,)


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]

    def _init_weights(self, module):
        # Used only for weights missing from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, DreamRMSNorm):
            nn.init.ones_(module.weight)


class DreamBaseModel(DreamPreTrainedModel):
    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        mask = padding_bias(attention_mask, x.dtype)  # layers get None or a 4-D mask
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        position_embeddings = self.rotary_emb(x, position_ids)
        hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            x = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)[0]
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden_states) if output_hidden_states else None)


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A 2-D 0/1 padding mask as an additive (B, 1, 1, T) bias over keys; None when nothing is padded.

    4-D masks (bool: True = attend, or additive floats) pass through unchanged.
    """
    if attention_mask is None or (isinstance(attention_mask, str) and attention_mask == "full"):
        return None
    if attention_mask.dim() == 4:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(dtype)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq) or 4-D, got shape {tuple(attention_mask.shape)}")
    if not bool((attention_mask == 0).any()):
        return None
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    bias = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)


class DreamModel(DreamPreTrainedModel):
    """The Hugging Face wrapper: ``model`` is the decoder, ``lm_head`` the (untied) output head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # used only if tie_word_embeddings

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels=None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        if past_key_values is not None or use_cache:
            raise NotImplementedError("Dream has no KV cache")
        if output_attentions:
            raise ValueError("output_attentions is not supported in Dream")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, output_hidden_states=bool(output_hidden_states))
        logits = self.lm_head(out.last_hidden_state)  # unshifted: position i-1 predicts token i
        if return_dict is False:
            return (logits,) + ((out.hidden_states,) if output_hidden_states else ())
        return MaskedLMOutput(logits=logits, hidden_states=out.hidden_states)
