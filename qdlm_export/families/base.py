"""What a model family *is*, as data: where its blocks live, which linears share an input, which norm
feeds which linears, how its attention is shaped, and how it is used as a masked diffusion model.

Methods read a :class:`FamilyAdapter`; they never branch on model names. Adding a family is one file in
this package that builds an adapter and registers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input, in forward order within the block.

    ``norm`` names the norm whose output is that input (so scales/rotations can be folded into it);
    ``prev_linear`` names the linear whose output is that input (v -> attention output, up -> down)
    when no norm sits between them. Names are relative to the block.

    Mixture-of-experts layers (all fields below default to the dense layout):

    * ``experts`` -- the ``ModuleList`` of routed experts (relative to the block) this group is a
      template for: ``linears`` and ``prev_linear`` are then relative to *one* expert, and the group
      stands for one group per expert (:meth:`FamilyAdapter.block_groups` expands it). ``norm`` is
      still the block's norm, which every expert (and the router) reads.
    * ``routed`` -- set on such an expanded group: its linears see only the tokens the router sends
      that expert, possibly none; a method must not assume it received inputs. ``expert`` names that
      expert's module (its forward is the expert's MLP) and ``expert_input`` the norm whose output
      reaches the mixture-of-experts block (every token: what "all-tokens" calibration feeds it).
    * ``optional`` -- the group exists in some blocks only (a dense MLP that sparse layers replace, a
      shared expert); blocks without its first linear skip it.
    * ``row_split`` -- one fused linear whose output rows are these parts, in order (``("q", "k",
      "v")``: sizes from the attention shape, :meth:`FamilyAdapter.row_split_sizes`).
    * ``optional_linears`` -- linears of this group some blocks lack (DiffusionGemma's full-attention
      layers have no ``v_proj``: their keys are reused as values); the group is resolved per block
      without them.
    """

    linears: tuple[str, ...]
    norm: str | None = None
    prev_linear: str | None = None
    role: str = ""  # "qkv", "attn_out", "gate_up", "down", "expert_gate_up"...: for humans and per-role options
    experts: str | None = None
    routed: bool = False
    optional: bool = False
    row_split: tuple[str, ...] = ()
    expert: str | None = None
    expert_input: str | None = None
    optional_linears: tuple[str, ...] = ()

    def for_expert(self, index: int, expert_input: str | None = None) -> "LinearGroup":
        """This expert template as the concrete group of expert ``index`` (names relative to the
        block); ``expert_input``: the norm feeding the experts (default: this template's own)."""
        base = f"{self.experts}.{index}"
        return LinearGroup(
            linears=tuple(f"{base}.{name}" for name in self.linears), norm=self.norm,
            prev_linear=f"{base}.{self.prev_linear}" if self.prev_linear else None,
            role=self.role, routed=True, row_split=self.row_split, expert=base,
            expert_input=expert_input or self.norm,
            optional_linears=tuple(f"{base}.{name}" for name in self.optional_linears),
        )

    def present(self, exists) -> "LinearGroup | None":
        """This group as one block has it: without the optional linears ``exists(name)`` denies;
        None when a required linear is missing."""
        if not self.optional_linears:
            return self
        linears = tuple(n for n in self.linears if n not in self.optional_linears or exists(n))
        return replace(self, linears=linears, optional_linears=())


@dataclass(frozen=True)
class ExpertRouting:
    """A mixture-of-experts module's routing, for a module with no dispatch method of its own (its
    forward is then replaced as a whole: ``loader/grouped_experts.py``). Names are attributes of the
    module. As computed: ``p = score(router(x))`` in float32, ``+ bias`` when the module's ``bias``
    attribute is not None (the biased values also weight the experts), top-``top_k``, divided by their
    sum when the module's ``normalize`` attribute is true, cast to the hidden dtype; each expert's
    output times its weight is added, in the hidden dtype, in expert order."""

    router: str  # the linear giving router logits [tokens, experts]
    top_k: str  # int attribute: experts per token
    score: str = "softmax"  # the only one the loader knows
    bias: str | None = None  # buffer (or None) added to the scores
    normalize: str | None = None  # bool attribute: renormalise the top-k weights


@dataclass(frozen=True)
class ExpertDispatch:
    """Where the loader computes a block's routed experts in one grouped pass (``loader/grouped_experts.py``).

    ``module`` (relative to a block) holds the ``experts`` ``ModuleList``; each expert computes
    ``down(act(gate(x)) * up(x))`` with the linears and activation attribute named here. Either
    ``method`` names the module's dispatch method ``f(x [tokens, hidden], topk_ids, topk_weight) ->
    [tokens, hidden]`` (replaced on the instance; the published code keeps the routing), or
    ``routing`` describes the routing and the module's ``forward`` is replaced."""

    module: str
    experts: str = "experts"
    method: str | None = None
    routing: ExpertRouting | None = None
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    activation: str = "act_fn"


@dataclass(frozen=True)
class FusedExperts:
    """Routed experts stored as 3-D parameters of one module rather than a ``ModuleList`` of linears
    (transformers' native mixture-of-experts layout: DiffusionGemma, Gemma 4, Qwen3-MoE in v5).

    ``module`` (relative to a block) holds ``gate_up`` [experts, 2 * intermediate, hidden] (the gate
    rows, then the up rows) and ``down`` [experts, hidden, intermediate]; its forward is
    ``forward(hidden [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])`` and each
    expert computes ``down(act(gate x) * up x)`` with the activation attribute ``activation``.

    Quantization sees the unfused view: ``module`` replaced by a ``ModuleList``-like module whose
    expert ``e`` has the linears ``gate``, ``up`` and ``down`` (``module.e.gate_proj`` ...), so the
    expert templates of ``groups`` (``experts=module``) apply unchanged; the native format stores the
    quantized experts stacked back into 3-D tensors under ``module.gate_up``/``module.down``."""

    module: str = "experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    activation: str = "act_fn"
    gate: str = "gate_proj"  # the unfused view's linear names
    up: str = "up_proj"
    down_linear: str = "down_proj"


@dataclass(frozen=True)
class SharedStack:
    """A second stack of layers computing with the weights of ``blocks`` (tied; the checkpoint stores
    them once, under ``blocks``): DiffusionGemma's causal encoder ``model.encoder.language_model`` over
    the decoder's weights.

    ``alias`` maps the second stack's names to the stored ones by prefix (``(alias prefix, stored
    prefix)``): a tensor named under the alias prefix that the checkpoint lacks is the stored one
    (layers, embeddings and final norm). Tensors the checkpoint does store under the alias (each
    stack's own ``layer_scalar``) stay the stack's own. ``cache`` is the keyword through which the
    shared stack's layer ``i`` writes the key/value cache that layer ``i`` of ``blocks`` reads."""

    layers: str
    alias: tuple[str, str]
    cache: str = "cache"

    def stored_name(self, name: str) -> str | None:
        """The stored name ``name`` (under the alias prefix) stands for, else None."""
        alias, stored = self.alias
        return stored + name[len(alias):] if name.startswith(alias) else None


@dataclass(frozen=True)
class AttentionVariant:
    """Layers of one type (``config.layer_types[i]``) whose attention is shaped by other config keys
    (DiffusionGemma's full-attention layers: ``global_head_dim``, ``num_global_key_value_heads``)."""

    layer_type: str
    head_dim_keys: tuple[str, ...] = ()
    num_kv_heads_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


@dataclass(frozen=True)
class FamilyAdapter:
    """Architecture facts of one model family. All module paths are dotted ``named_modules`` names."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values this adapter claims
    blocks: str  # the ModuleList of decoder blocks, e.g. "model.transformer.blocks"
    groups: tuple[LinearGroup, ...]  # every quantizable linear of a block, in forward order
    embeddings: str
    final_norm: str
    lm_head: str
    # Config keys, in order of preference, for the attention shape (configs differ across families).
    hidden_size_keys: tuple[str, ...] = ("hidden_size",)
    num_heads_keys: tuple[str, ...] = ("num_attention_heads",)
    num_kv_heads_keys: tuple[str, ...] = ("num_key_value_heads",)
    head_dim_keys: tuple[str, ...] = ("head_dim",)
    num_layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    # Config keys of the MLP width and of the longest input the model was built for (checked against
    # the weights and against --seqlen; absent keys skip the check).
    intermediate_size_keys: tuple[str, ...] = ("intermediate_size", "mlp_hidden_size")
    max_context_keys: tuple[str, ...] = ("max_position_embeddings", "max_sequence_length", "n_positions")
    tie_keys: tuple[str, ...] = ("tie_word_embeddings",)
    # dLLM facts.
    is_diffusion: bool = True
    default_mask_token_id: int | None = None
    mask_token_id_keys: tuple[str, ...] = ("mask_token_id",)
    logits_shift: bool = False  # True: logits at i-1 predict token i (Dream)
    needs_remote_code: bool = True
    auto_class: str = "AutoModel"  # the Auto class that loads the full model with its head
    # How people write the family's name (model cards); empty: ``name`` is shown.
    display_name: str = ""
    # Mixture of experts: the router (relative to a block) that reads the same norm as the experts and
    # picks them per token. It stays in full precision (it is not listed in ``groups``).
    router: str | None = None
    # Block diffusion (LLaDA2): the block length of the family's published sampler. Attention is
    # bidirectional inside a block and causal across blocks; calibration reproduces that pattern.
    # None: the whole sequence is one block (LLaDA, Dream).
    block_length: int | None = None
    # Mixture of experts: how the loader runs a block's routed experts through the grouped expert GEMM
    # (None: the published per-expert loop).
    expert_dispatch: ExpertDispatch | None = None
    # Mixture of experts stored as 3-D parameters (None: a ModuleList of per-expert linears).
    fused_experts: FusedExperts | None = None
    # False: the router reads its own input (DiffusionGemma normalises the residual itself), so a
    # transform of the experts' norm must not be folded into it.
    router_norm_shared: bool = True
    # A second layer stack over the same stored weights (DiffusionGemma's causal encoder).
    shared_stack: SharedStack | None = None
    # The config section the text model's keys live in (multimodal configs: "text_config"); keys are
    # looked up at the top level first, then there.
    config_section: str | None = None
    # Per-layer attention shapes (``layer_types_key`` names the per-layer type list).
    attention_variants: tuple[AttentionVariant, ...] = ()
    layer_types_key: str = "layer_types"
    # Norms applied to what a block adds to the residual stream (Gemma's post-norms, with gains): an
    # orthogonal rotation of the residual stream cannot pass through them, so rotation methods rotate
    # each linear's input online instead of the stream (methods/quarot.py).
    residual_post_norms: tuple[str, ...] = ()
    # How the diffusion noises tokens: "mask" (a mask token, LLaDA/Dream) or "uniform" (uniformly
    # random tokens, no mask token: DiffusionGemma).
    noise: str = "mask"
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def linear_names(self) -> tuple[str, ...]:
        """The linears *every* block has (all of them for dense families; for mixtures of experts the
        experts and the optional groups are resolved per block: :meth:`block_groups`)."""
        return tuple(name for group in self.groups if not (group.experts or group.optional)
                     for name in group.linears if name not in group.optional_linears)

    @property
    def has_experts(self) -> bool:
        return any(group.experts for group in self.groups)

    def block_groups(self, block: nn.Module) -> tuple[LinearGroup, ...]:
        """The concrete groups of one block, in forward order: expert templates expanded to one group
        per expert the block holds, optional groups the block lacks left out."""
        def exists(name: str) -> bool:
            try:
                block.get_submodule(name)
            except AttributeError:
                return False
            return True

        def experts_of(path: str) -> list[int]:
            return list(range(len(block.get_submodule(path)))) if exists(path) else []

        return self._resolve(exists, experts_of)

    def stored_linears(self, index: int, keys: Any) -> list[str]:
        """Full names of block ``index``'s linears, resolved against the checkpoint's tensor names
        ``keys`` (what :meth:`block_groups` gives for the built block, without building it)."""
        prefix = self.block_prefix(index) + "."
        local = {key[len(prefix):] for key in keys if key.startswith(prefix)}

        def exists(name: str) -> bool:
            return f"{name}.weight" in local

        def experts_of(path: str) -> list[int]:
            head = path + "."
            found = {k[len(head):].split(".", 1)[0] for k in local if k.startswith(head)}
            return sorted(int(i) for i in found if i.isdigit())

        return [prefix + name for group in self._resolve(exists, experts_of) for name in group.linears]

    def _resolve(self, exists, experts_of) -> tuple[LinearGroup, ...]:
        groups: list[LinearGroup] = []
        for group in self.groups:
            if group.experts:
                feeder = self.expert_input(group.experts)
                groups += [group.for_expert(i, feeder) for i in experts_of(group.experts)
                           if exists(group.for_expert(i).linears[0])]
            elif not group.optional or exists(group.linears[0]):
                groups.append(group.present(exists))
        return tuple(groups)

    def with_router_quantized(self) -> "FamilyAdapter":
        """This family with its router quantized like the other linears (``--include-router``): a
        group of its own, reading the norm the experts read, placed before the experts (the router runs
        first). The variant has no full-precision router left for methods to fold into."""
        if self.router is None:
            return self
        first = next(i for i, g in enumerate(self.groups) if g.experts)
        norm = self.expert_input(self.groups[first].experts)
        router = LinearGroup((self.router,), norm=norm, role="router", optional=True)
        groups = self.groups[:first] + (router,) + self.groups[first:]
        return replace(self, groups=groups, router=None)

    def expert_input(self, experts: str) -> str | None:
        """The norm read by the first template of the ``experts`` list: the input of every expert."""
        return next((g.norm for g in self.groups if g.experts == experts and g.norm), None)

    def text_config(self, config: Any) -> Any:
        """The section of ``config`` holding the text model's keys (the config itself by default)."""
        if self.config_section is None:
            return config
        section = config.get(self.config_section) if isinstance(config, dict) else getattr(
            config, self.config_section, None)
        return config if section is None else section

    def row_split_sizes(self, group: LinearGroup, config: Any, layer: int | None = None) -> tuple[int, ...]:
        """Output rows of each part of a fused linear (``row_split``), from the attention shape."""
        shape = self.attention_shape(config, layer)
        sizes = {"q": shape.num_heads * shape.head_dim, "k": shape.num_kv_heads * shape.head_dim,
                 "v": shape.num_kv_heads * shape.head_dim}
        return tuple(sizes[part] for part in group.row_split)

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        blocks = model.get_submodule(self.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"{self.blocks} is {type(blocks).__name__}, expected a ModuleList of blocks")
        return blocks

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}"

    def quantizable_linears(self, num_blocks: int) -> list[str]:
        """Full names of every linear the adapter lists, block by block, in forward order."""
        return [f"{self.block_prefix(i)}.{name}" for i in range(num_blocks) for name in self.linear_names]

    def attention_shape(self, config: Any, layer: int | None = None) -> AttentionShape:
        """The attention shape of layer ``layer`` (None: the default layers')."""
        config = self.text_config(config)
        hidden = _first(config, self.hidden_size_keys)
        heads = _first(config, self.num_heads_keys)
        head_dim_keys, kv_keys = self.head_dim_keys, self.num_kv_heads_keys
        variant = self.attention_variant(config, layer)
        if variant is not None:
            head_dim_keys = variant.head_dim_keys + head_dim_keys
            kv_keys = variant.num_kv_heads_keys + kv_keys
        kv_heads = _first(config, kv_keys, default=None) or heads
        head_dim = _first(config, head_dim_keys, default=None) or hidden // heads
        return AttentionShape(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, hidden_size=hidden)

    def layer_type(self, config: Any, layer: int) -> str | None:
        types = _first(self.text_config(config), (self.layer_types_key,), default=None)
        return types[layer] if isinstance(types, (list, tuple)) and layer < len(types) else None

    def attention_variant(self, config: Any, layer: int | None) -> AttentionVariant | None:
        if layer is None or not self.attention_variants:
            return None
        kind = self.layer_type(config, layer)
        return next((v for v in self.attention_variants if v.layer_type == kind), None)

    def num_layers(self, config: Any) -> int:
        return _first(self.text_config(config), self.num_layers_keys)

    def max_context(self, config: Any) -> tuple[str, int] | None:
        """``(config key, value)`` of the model's maximum sequence length, or None when unknown."""
        config = self.text_config(config)
        for key in self.max_context_keys:
            value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
        return None

    def mask_token_id(self, config: Any) -> int | None:
        if self.noise != "mask":
            return None
        return _first(config, self.mask_token_id_keys, default=None) or self.default_mask_token_id

    def ties_embeddings(self, config: Any) -> bool:
        return bool(_first(config, self.tie_keys, default=False))


_MISSING = object()


def _first(config: Any, keys: tuple[str, ...], default: Any = _MISSING) -> Any:
    for key in keys:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if value is not None:
            return value
    if default is _MISSING:
        raise KeyError(f"none of the config keys {keys} is set")
    return default
