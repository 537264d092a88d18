"""The layer walk of DiffusionGemma on its denoising path: each step quantizes decoder layer ``i``,
whose weights the causal encoder's layer ``i`` computes with too, on the inputs both layers see.

In the model a window's clean context goes through the encoder layer (causal attention, sliding or
full by the layer's type; it writes the layer's key/value cache) and the noised canvas through the
decoder layer (bidirectional over the canvas and the cached context; a sliding layer's cache keeps
only the last ``sliding_window - 1`` context positions). :class:`PairedLayer` computes both in **one**
call of the decoder layer on the packed sequence ``[context; canvas]``, with positions ``0 .. C + K - 1``
(the decoder's positions continue after the cache) and one attention mask per layer type that is
exactly that pattern (:func:`packed_attention_masks`):

* context rows: causal over the context; sliding layers also ``j > i - sliding_window`` (transformers'
  sliding-window causal mask);
* canvas rows: every canvas position, and the context positions the encoder's cache holds for the
  decoder: all of them in full-attention layers, the last ``sliding_window - 1`` in sliding ones.

A key/value cache is exactly the context's keys and values, so the decoder attending to the context
rows' keys is the decoder attending to the cache. The rest of the layer is per token; only
``layer_scalar`` differs between the stacks (each stack stores its own): the context rows are scaled
by the encoder layer's, the canvas rows by the decoder layer's.

Why one packed call rather than the encoder layer then the decoder layer: the methods collect a
linear's inputs with hooks that take its first call per batch and stop the forward once every hooked
module has had one (``methods/capture.py``, the experts' all-token inputs in ``methods/experts.py``).
The two stacks share their modules, so with two calls the encoder's call would be the only one seen
and the canvas would never reach the statistics. Packed, each linear, norm and expert is called once
per batch with every context and canvas token. Tests check that a chain of these layers reproduces
the model's own ``forward(input_ids=context, decoder_input_ids=canvas, self_conditioning_logits=...)``
(tests/quantize/test_denoising_calibration.py).

Hidden states travel packed, ``[batch, C + K, hidden]``; the split and the per-type masks and rotary
tables are keyword arguments of every batch (:func:`capture_denoising_inputs`), so
``BlockCalibration.run`` and the methods re-run a layer without knowing any of this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..methods.base import BlockCalibration
from .denoising_calibration import DenoisingWindows, soft_embeddings

# Modules of ``DiffusionGemmaForBlockDiffusion`` outside the layers that the block-0 inputs need.
EMBEDDINGS = "model.decoder.embed_tokens"  # tied to the encoder's (and to the LM head)
SELF_CONDITIONING = "model.decoder.self_conditioning"
ROTARY = "model.decoder.rotary_emb"  # the encoder's has the same tables (same text config)
ENCODER_LAYERS = "model.encoder.language_model.layers"
DECODER_LAYERS = "model.decoder.layers"

# Attention implementations whose masks this walk can build: boolean masks for SDPA, additive for eager.
_MASK_FORMATS = {"sdpa": "bool", "eager": "additive", None: "additive"}

ShareModules = Callable[[nn.Module, nn.Module], Any]  # (block, shared_layer); e.g. shared_stack_view.share_modules


def packed_attention_masks(context_length: int, canvas_length: int, sliding_window: int | None,
                           layer_types: list[str] | tuple[str, ...],
                           device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Per layer type, ``[1, 1, S, S]`` booleans (``S = C + K``), True where packed position ``i`` may
    attend to ``j`` (module docstring)."""
    total = context_length + canvas_length
    i = torch.arange(total, device=device)[:, None]
    j = torch.arange(total, device=device)[None, :]
    context_row, context_key = i < context_length, j < context_length
    causal = j <= i
    masks = {}
    for kind in dict.fromkeys(layer_types):
        if kind == "full_attention":
            allowed = torch.where(context_row, causal, torch.ones_like(causal))
        elif kind == "sliding_attention":
            if not sliding_window or sliding_window <= 0:
                raise ValueError("sliding-attention layers need a positive sliding_window")
            cached = j >= context_length - (sliding_window - 1)  # what the sliding cache layer keeps
            allowed = torch.where(context_row, causal & (j > i - sliding_window), ~context_key | cached)
        else:
            raise UnsupportedModelError(f"layer type {kind!r} is not one DiffusionGemma's denoising walk knows",
                                        hint="expected full_attention and sliding_attention layers")
        masks[kind] = allowed[None, None]
    return masks


def _check_text_config(config: Any) -> None:
    if getattr(config, "use_bidirectional_attention", None) == "all":
        raise UnsupportedModelError(
            "this DiffusionGemma config sets use_bidirectional_attention='all' (a bidirectional encoder); "
            "the denoising calibration walk reproduces the causal encoder of the published models only",
            hint="the published DiffusionGemma configs set use_bidirectional_attention='vision' (a causal "
            "encoder for text); use such a config, or quantize without calibration (rtn)",
        )


def _rotary(model: nn.Module, device: torch.device) -> nn.Module:
    """The decoder's rotary module, rebuilt from its config when its tables are not materialised."""
    rotary = model.get_submodule(ROTARY)
    if any(b.is_meta for b in rotary.buffers()):
        rotary = type(rotary)(rotary.config, device=device)
    return rotary


@torch.no_grad()
def capture_denoising_inputs(model: nn.Module, windows: DenoisingWindows, *, batch_size: int,
                             device: torch.device | str | None = None) -> BlockCalibration:
    """The inputs of the first :class:`PairedLayer`, per batch of ``windows``: packed hidden states
    ``[b, C + K, hidden]`` (the embedded context; the embedded canvas through the decoder's
    self-conditioning MLP with :func:`soft_embeddings`) and the keyword arguments every layer takes.

    Only the embeddings, the self-conditioning MLP and the rotary tables are used: ``model`` may hold
    its layers on ``meta`` (the pipeline's skeleton). Works on a ``from_pretrained`` model as well."""
    embed = model.get_submodule(EMBEDDINGS)
    device = torch.device(device) if device is not None else embed.weight.device
    rotary = _rotary(model, device)
    config = rotary.config
    _check_text_config(config)
    self_conditioning = model.get_submodule(SELF_CONDITIONING)
    context, canvas = windows.context_length, windows.canvas_length
    masks = packed_attention_masks(context, canvas, getattr(config, "sliding_window", None), config.layer_types,
                                   device=device)
    vocab_sum = embed.weight.to(torch.promote_types(embed.weight.dtype, torch.float32)).sum(0) if canvas else None
    calib = BlockCalibration(hidden=[])
    shared_kwargs = None
    for batch in windows.batches(batch_size):
        hidden = embed(batch.context.to(embed.weight.device))
        if canvas:
            noisy = embed(batch.canvas.to(embed.weight.device))
            hidden = torch.cat([hidden, self_conditioning(noisy, soft_embeddings(batch, embed, vocab_sum))], dim=1)
        hidden = hidden.to(device)
        if shared_kwargs is None:  # one set for every batch: positions and masks do not depend on the window
            positions = torch.arange(context + canvas, device=device)[None]
            shared_kwargs = {
                "context_length": context,
                "position_embeddings": {kind: rotary(hidden, positions, kind) for kind in masks},
                "attention_masks": masks,
            }
        calib.hidden.append(hidden)
        calib.call_args.append(())
        calib.call_kwargs.append(shared_kwargs)
    return calib


class PairedLayer(nn.Module):
    """Decoder layer ``block`` and encoder layer ``shared_layer`` as one block over packed hidden
    states (module docstring).

    A view of ``block``: it holds the very tables of ``block``'s submodules, parameters and buffers, so
    its names are the decoder layer's (``get_submodule("self_attn.q_proj")``, ``named_modules()``,
    ``named_parameters()``), and a module set through it (``setattr(paired.self_attn, "q_proj", ...)``
    or ``setattr(paired, "experts", ...)``) is set on ``block``. ``share(block, shared_layer)`` runs
    before every forward, so the encoder layer keeps computing with whatever a method left in ``block``;
    only its ``layer_scalar`` is read here."""

    def __init__(self, shared_layer: nn.Module, block: nn.Module, *, share: ShareModules | None = None,
                 layer_type: str | None = None):
        super().__init__()
        self._modules = block._modules
        self._parameters = block._parameters
        self._buffers = block._buffers
        self._non_persistent_buffers_set = block._non_persistent_buffers_set
        # object.__setattr__: registering them as modules would add them to block's own table
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "shared_layer", shared_layer)
        object.__setattr__(self, "share", share)
        kind = layer_type or getattr(getattr(block, "self_attn", None), "layer_type", None)
        if kind is None:
            raise ValueError("the decoder layer does not say its attention type; pass layer_type")
        self.layer_type = kind
        self.train(block.training)
        if share is not None:
            share(block, shared_layer)

    def forward(self, hidden: torch.Tensor, *, context_length: int,
                position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]],
                attention_masks: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        if self.share is not None:
            self.share(self.block, self.shared_layer)
        mask = _attention_mask(attention_masks[self.layer_type], self._attention_implementation(), hidden.dtype)
        with self._stack_scalars(hidden.shape[1], context_length):
            out = self.block(hidden, position_embeddings=position_embeddings[self.layer_type], attention_mask=mask,
                             **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _attention_implementation(self) -> str | None:
        config = getattr(getattr(self.block, "self_attn", None), "config", None)
        return getattr(config, "_attn_implementation", None)

    @contextmanager
    def _stack_scalars(self, total: int, context_length: int) -> Iterator[None]:
        """``layer_scalar`` per packed position for the duration of a forward: the encoder layer's on
        the context rows, the decoder layer's on the canvas rows (the layer multiplies its output
        ``[b, S, hidden]`` by it in place, so an ``[S, 1]`` tensor scales each row by its own stack's)."""
        decoder = self.block._buffers.get("layer_scalar")
        if decoder is None:
            yield
            return
        encoder = self.shared_layer.layer_scalar
        if encoder.is_meta or decoder.is_meta:
            raise RuntimeError("layer_scalar of the encoder or decoder layer is not materialised")
        rows = torch.cat([encoder.to(decoder).expand(context_length), decoder.expand(total - context_length)])
        self.block._buffers["layer_scalar"] = rows[:, None]
        try:
            yield
        finally:
            self.block._buffers["layer_scalar"] = decoder


def _attention_mask(allowed: torch.Tensor, implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """The boolean pattern in the form the attention implementation takes."""
    form = _MASK_FORMATS.get(implementation)
    if form is None:
        raise ConfigError(
            f"the denoising calibration walk cannot build masks for attn_implementation={implementation!r}",
            hint="load or build the model with attn_implementation='sdpa' (the default) or 'eager'",
        )
    if form == "bool":
        return allowed
    zero, low = torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min
    return torch.where(allowed, zero, torch.full((), low, dtype=dtype, device=allowed.device))


def paired_layer(model: nn.Module, index: int, *, share: ShareModules | None = None) -> PairedLayer:
    """Layer ``index`` of ``model`` (a ``DiffusionGemmaForBlockDiffusion`` or the pipeline's skeleton of
    one) as the block the walk quantizes."""
    return PairedLayer(model.get_submodule(ENCODER_LAYERS)[index], model.get_submodule(DECODER_LAYERS)[index],
                       share=share)


def unpack(hidden: torch.Tensor, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed hidden states split into (context rows, canvas rows)."""
    return hidden[:, :context_length], hidden[:, context_length:]
