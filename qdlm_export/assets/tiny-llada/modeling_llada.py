"""LLaDA modelling code (remote code, written for qdlm-export).

A compact re-implementation of what the public ``GSAI-ML/LLaDA-8B-Base`` remote code computes for
its released configuration: OLMo's "llama" block (RMSNorm, separate q/k/v projections, NeoX
rotate-half RoPE applied in fp32, SwiGLU MLP) run as a *bidirectional* mask predictor. Module and
parameter names are the public ones, so the released weights load into this code and the tiny test
models built by ``qdlm_export.fixtures`` are laid out exactly like the real checkpoint:

    model.transformer.wte                      token embeddings
    model.transformer.blocks.{i}.attn_norm     RMSNorm before attention
    model.transformer.blocks.{i}.{q,k,v}_proj  attention input projections
    model.transformer.blocks.{i}.attn_out      attention output projection
    model.transformer.blocks.{i}.ff_norm       RMSNorm before the MLP
    model.transformer.blocks.{i}.ff_proj       MLP gate projection
    model.transformer.blocks.{i}.up_proj       MLP up projection
    model.transformer.blocks.{i}.ff_out        MLP down projection
    model.transformer.ln_f                     final RMSNorm
    model.transformer.ff_out                   LM head (absent when weight_tying)

Differences from the public code, all outside the released configuration's behaviour: no training
features (dropout, activation checkpointing, init schemes, FSDP), no KV cache, and a padding
``attention_mask`` masks padded *keys* only (the public code folds it into a causal bias).
Every linear is called as a module (``self.q_proj(x)``) so a quantizer can swap ``nn.Linear`` out.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig


class RMSLayerNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the gain, as LLaDA (and Llama) do."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE (rotate the two halves of each head), applied to q and k together.

    Each block owns one, as in the public code, so tools can wrap ``block.rotary_emb.forward`` to act
    on the rotated q/k (QuaRot puts its online Hadamard there). The angles are recomputed per call
    from the config rather than kept in buffers: nothing to save, nothing to re-initialise after a
    meta-device load, and negligible cost next to the matmuls.
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.head_dim = config.d_model // config.n_heads
        self.theta = config.rope_theta
        self.full_precision = config.rope_full_precision

    def sin_cos(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float) / self.head_dim))
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim): the same angle for both halves
        return angles.sin()[None, None], angles.cos()[None, None]

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (B, n_heads, T, hd), k: (B, n_kv_heads, T, hd).
        q_, k_ = (q.float(), k.float()) if self.full_precision else (q, k)
        sin, cos = self.sin_cos(q.shape[-2], q.device)
        sin, cos = sin.to(q_.dtype), cos.to(q_.dtype)
        q_ = q_ * cos + self.rotate_half(q_) * sin
        k_ = k_ * cos + self.rotate_half(k_) * sin
        return q_.type_as(q), k_.type_as(k)


class LLaDALlamaBlock(nn.Module):
    """One pre-norm transformer block: x + attn(attn_norm(x)), then + mlp(ff_norm(x))."""

    def __init__(self, layer_id: int, config: LLaDAConfig):
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        d, hd = config.d_model, config.d_model // config.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.effective_n_kv_heads, hd
        qkv_bias = config.include_bias or config.include_qkv_bias
        hidden = config.effective_mlp_hidden_size
        self.attn_norm = RMSLayerNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSLayerNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)  # gate
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)  # down
        self.act = nn.SiLU()
        self.rotary_emb = RotaryEmbedding(config)

    def attention(self, q, k, v, attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary_emb(q, k)
        if self.n_kv_heads != self.n_heads:  # GQA: kv head j serves query heads j*g .. j*g+g-1
            g = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        # The mask predictor sees the whole sequence: never causal.
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, is_causal=False)
        return self.attn_out(att.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        # Same call signature and (hidden, cache) return as the public block, so block-by-block
        # calibration code written against these fixtures runs unchanged on the real model.
        if layer_past is not None or use_cache:
            raise NotImplementedError("LLaDA has no KV cache")
        h = self.attn_norm(x)
        x = x + self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), attention_bias)
        h = self.ff_norm(x)
        x = x + self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))
        return x, None


class LLaDAOutput(NamedTuple):
    logits: torch.Tensor
    attn_key_values: list | None
    hidden_states: tuple[torch.Tensor, ...] | None


class LLaDAModel(nn.Module):
    """The bare network, under ``transformer`` as in the public checkpoint's weight names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        unsupported = {
            "block_type": (config.block_type, "llama"), "layer_norm_type": (config.layer_norm_type, "rms"),
            "activation_type": (config.activation_type, "silu"), "rope": (config.rope, True),
            "alibi": (config.alibi, False), "attention_layer_norm": (config.attention_layer_norm, False),
            "block_group_size": (config.block_group_size, 1),
        }
        for key, (value, wanted) in unsupported.items():
            if value != wanted:
                raise NotImplementedError(f"this LLaDA code implements {key}={wanted!r} only, got {value!r}")
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.embedding_size or config.vocab_size, config.d_model),
            "ln_f": RMSLayerNorm(config.d_model, config.rms_norm_eps),
            "blocks": nn.ModuleList(LLaDALlamaBlock(i, config) for i in range(config.n_layers)),
        })
        if not config.weight_tying:
            self.transformer.update({"ff_out": nn.Linear(
                config.d_model, config.embedding_size or config.vocab_size, bias=config.include_bias)})

    def forward(self, input_ids=None, input_embeddings=None, attention_mask=None, output_hidden_states=False):
        x = self.transformer.wte(input_ids) if input_embeddings is None else input_embeddings
        if self.config.input_emb_norm:
            x = x * self.config.d_model**0.5
        # Padding: an additive bias that hides padded keys from every query, (B, 1, 1, T).
        bias = None
        if attention_mask is not None and bool((attention_mask == 0).any()):
            keep = attention_mask.to(torch.bool)[:, None, None, :]
            bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)
        hidden_states = []
        for block in self.transformer.blocks:
            if output_hidden_states:
                hidden_states.append(x)
            x, _ = block(x, attention_bias=bias)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden_states.append(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return LLaDAOutput(logits, None, tuple(hidden_states) if output_hidden_states else None)


class LLaDAModelLM(PreTrainedModel):
    """The Hugging Face wrapper: ``model`` is the network; logits are per position, not shifted."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config: LLaDAConfig, model: LLaDAModel | None = None, init_params: bool = False):
        # ``init_params`` is accepted for the public signature; weights come from the checkpoint.
        super().__init__(config)
        self.model = model if model is not None else LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        # Used only for weights missing from a checkpoint; the released weights overwrite all of these.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSLayerNorm):
            nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        labels=None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        # ``labels`` is accepted and ignored, as in the public code: the masked-diffusion loss needs the
        # mask and the noise level, so callers compute it from the logits.
        if past_key_values is not None or use_cache:
            raise NotImplementedError("LLaDA has no KV cache")
        if output_attentions:
            raise ValueError("output_attentions is not supported in LLaDA")
        out = self.model(input_ids, inputs_embeds, attention_mask, bool(output_hidden_states))
        if return_dict is False:
            return (out.logits,) + ((out.hidden_states,) if output_hidden_states else ())
        return CausalLMOutputWithPast(logits=out.logits, hidden_states=out.hidden_states)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.transformer.wte if self.config.weight_tying else self.model.transformer.ff_out

    def set_output_embeddings(self, value):
        if self.config.weight_tying:
            self.model.transformer.wte = value
        else:
            self.model.transformer.ff_out = value
