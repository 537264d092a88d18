"""In-memory repairs of published dLLM remote code that the installed transformers cannot run as is.

The code the public LLaDA (8B Base/Instruct, 1.5) and Dream (v0 Base/Instruct, Dream-Coder,
DiffuCoder) checkpoints ship was written for transformers 4. Under transformers 5 it breaks in a few
known ways; :func:`repair_module` patches the classes of an imported remote-code module (never the
user's files) so that they construct, load and run as their authors intended:

=================================  =============================================================
``config-use-cache``               the config class hands ``use_cache`` to the base class, which no
                                   longer keeps it: the value is kept on the config.
``post-init``                      the model class never calls ``post_init()`` (transformers 5
                                   needs the attributes it sets): it is called after ``__init__``.
``tie-weights-kwargs``             ``tie_weights(self)`` takes no arguments; transformers' keyword
                                   arguments are dropped before calling it.
``tied-weights-keys-list``         ``_tied_weights_keys`` is a list; it is served as the mapping
                                   transformers 5 expects (tied key -> input embeddings).
``rope-default-init``              ``ROPE_INIT_FUNCTIONS["default"]`` is gone; the module sees the
                                   plain RoPE definition under that name.
``rotary-inv-freq``                ``from_pretrained`` leaves non-persistent rotary ``inv_freq``
                                   buffers uninitialised; they are recomputed as 1/theta^(2i/d).
``generation-config-validate``     ``GenerationConfig.validate`` overridden without ``**kwargs``;
                                   transformers' keyword arguments are dropped.
``generation-config-from-model``   ``from_model_config`` of a ``GenerationConfig`` subclass with
                                   fields of its own fails (transformers 5 compares every field
                                   with a plain ``GenerationConfig()``): it is built from the model
                                   config's values as transformers 4 did.
``attn-mask-utils-module``         ``transformers.modeling_attn_mask_utils`` (LLaDA2's modeling file
                                   imports its 4-D mask helpers) is gone in 5.0-5.24 (5.25 has it
                                   again): a stand-in with transformers 4's semantics is served then.
``torch-fx-available``             ``transformers.utils.import_utils.is_torch_fx_available`` is gone:
                                   provided (torch.fx is always available with torch >= 2).
=================================  =============================================================

The last two are import repairs: they must exist before the model's file is imported, so importing
this module installs them (:func:`install_import_repairs`); each serves only what the installed
transformers lacks (a finder consulted after every other one; an attribute set only when missing)
and is logged when the model's code uses it.

Every repair is detected by behaviour (what the code does with the installed transformers), not by
file hashes or model names, is idempotent, and is logged *when it takes effect*, so
:func:`applied_repairs` lists what a run actually needed.

This module is also copied into self-contained checkpoints (``qdlm_compat.py``, see
formats/selfcontained.py) and called from the lines appended to their modeling files, so it may
import only the standard library, torch and transformers.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import sys
from typing import Any

import torch

REPAIRS = {
    "config-use-cache": "the config class drops use_cache under this transformers; the value is kept on the config",
    "post-init": "the model class never calls post_init(); it is called after construction",
    "tie-weights-kwargs": "tie_weights() takes no arguments; transformers' keyword arguments are dropped",
    "tied-weights-keys-list": "_tied_weights_keys is a list; it is served as a mapping to the input embeddings",
    "rope-default-init": "ROPE_INIT_FUNCTIONS has no 'default' entry; the plain RoPE definition is provided",
    "rotary-inv-freq": "rotary inv_freq buffers were left uninitialised by from_pretrained; recomputed as 1/theta^(2i/d)",
    "generation-config-validate": "GenerationConfig.validate() takes no keyword arguments; transformers' are dropped",
    "generation-config-from-model": "GenerationConfig.from_model_config() fails on the subclass's own fields; "
    "built from the model config's values as in transformers 4",
    "attn-mask-utils-module": "transformers.modeling_attn_mask_utils is gone; a stand-in with transformers 4's "
    "4-D mask helpers is imported instead",
    "torch-fx-available": "transformers.utils.import_utils.is_torch_fx_available is gone; provided",
}
_MARK = "_qdlm_compat"  # set on every function this module installs (idempotence, across copies)
_LOG: dict[str, set[str]] = {}  # repair id -> the classes/modules it was applied to, in this process


def _log(repair: str, where: str) -> None:
    _LOG.setdefault(repair, set()).add(where)


def reset_log() -> None:
    """Forget the repairs logged so far (a new run starts)."""
    _LOG.clear()


def applied_repairs() -> list[str]:
    """The repairs that took effect since :func:`reset_log`, one readable line each."""
    return [f"{rid}: {REPAIRS[rid]} ({', '.join(sorted(_LOG[rid]))})" for rid in REPAIRS if rid in _LOG]


def applied_repair_ids() -> list[str]:
    return [rid for rid in REPAIRS if rid in _LOG]


def _marked(fn: Any) -> bool:
    return bool(getattr(getattr(fn, "__func__", fn), _MARK, False))


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _call_with_accepted(fn, self, args, kwargs):
    """Call ``fn(self, ...)`` with only the arguments its signature takes."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        use_args = args
    else:
        use_args = args[: len(positional)]
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    taken = {p.name for p in positional[: len(use_args)]}
    use_kwargs = {k: v for k, v in kwargs.items() if k in names and k not in taken}
    return fn(self, *use_args, **use_kwargs)


# ---- entry points ---------------------------------------------------------------------------------

def repair_module(namespace: Any) -> list[str]:
    """Patch the remote-code classes visible in ``namespace`` (a module or its ``globals()``).

    Covers the classes the module defines or imports from other remote-code modules (Dream's
    ``DreamGenerationConfig`` comes from generation_utils.py), never transformers' or torch's own.
    Returns the ids of the repairs installed now (each is logged again whenever it takes effect).
    """
    ns = namespace if isinstance(namespace, dict) else vars(namespace)
    installed: list[str] = []
    rope = ns.get("ROPE_INIT_FUNCTIONS")
    if isinstance(rope, dict) and "default" not in rope:
        patched = dict(rope)
        patched["default"] = _default_rope_init
        ns["ROPE_INIT_FUNCTIONS"] = patched  # the module's own binding; transformers' dict is untouched
        installed.append("rope-default-init")
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

    for obj in list(ns.values()):
        if not isinstance(obj, type) or obj.__module__.split(".")[0] in ("transformers", "torch"):
            continue
        if issubclass(obj, PretrainedConfig):
            installed += _repair_config_class(obj)
        elif issubclass(obj, PreTrainedModel):
            installed += _repair_model_class(obj)
        elif issubclass(obj, GenerationConfig):
            installed += _repair_generation_config_class(obj)
    return installed


def repair_config(config: Any, config_dict: dict | None = None) -> None:
    """Repair a config instance built before its class was patched (``use_cache`` lost)."""
    if not hasattr(config, "use_cache") and config_dict is not None and "use_cache" in config_dict:
        config.use_cache = config_dict["use_cache"]
        _log("config-use-cache", type(config).__name__)


# ---- config classes -------------------------------------------------------------------------------

def _repair_config_class(cls: type) -> list[str]:
    init = cls.__dict__.get("__init__")
    if init is None or _marked(init):
        return []
    try:
        params = inspect.signature(init).parameters
    except (TypeError, ValueError):
        return []
    default = params["use_cache"].default if "use_cache" in params else False
    if default is inspect.Parameter.empty:
        default = False
    try:
        probe = cls(use_cache=default)
    except Exception:  # cannot build one without arguments: nothing can be learned by behaviour
        return []
    if hasattr(probe, "use_cache"):
        return []

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not hasattr(self, "use_cache"):
            self.use_cache = kwargs.get("use_cache", default)
            _log("config-use-cache", cls.__name__)

    cls.__init__ = _mark(__init__)
    return ["config-use-cache"]


# ---- model classes --------------------------------------------------------------------------------

def _repair_model_class(cls: type) -> list[str]:
    installed = []
    init = cls.__dict__.get("__init__")
    if init is not None and not _marked(init):

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            # Only for the class being built (a base class's __init__ runs before its subclass is done).
            if type(self) is cls and not hasattr(self, "all_tied_weights_keys"):
                self.post_init()
                _log("post-init", cls.__name__)

        cls.__init__ = _mark(__init__)
        installed.append("post-init")

    tie = cls.__dict__.get("tie_weights")
    if tie is not None and not _marked(tie) and not _accepts(tie, "recompute_mapping"):

        @functools.wraps(tie)
        def tie_weights(self, *args, **kwargs):
            if args or kwargs:
                _log("tie-weights-kwargs", cls.__name__)
            return _call_with_accepted(tie, self, args, kwargs)

        cls.tie_weights = _mark(tie_weights)
        installed.append("tie-weights-kwargs")

    tied = cls.__dict__.get("_tied_weights_keys")
    if isinstance(tied, (list, tuple, set)):
        keys = list(tied)

        def _tied_weights_keys(self):
            _log("tied-weights-keys-list", cls.__name__)
            return _tied_mapping(self, keys)

        cls._tied_weights_keys = property(_mark(_tied_weights_keys))
        installed.append("tied-weights-keys-list")

    fp = cls.__dict__.get("from_pretrained")
    if not _marked(fp) and not _marked(getattr(cls, "from_pretrained", None)):
        original = cls.from_pretrained.__func__  # what the class resolves to now (its own or a base's)

        @functools.wraps(original)
        def from_pretrained(klass, *args, **kwargs):
            model = original(klass, *args, **kwargs)
            repair_rotary_buffers(model)
            return model

        cls.from_pretrained = classmethod(_mark(from_pretrained))
    return installed


def _tied_mapping(model, keys: list[str]) -> dict[str, str]:
    """A list of tied parameter names as transformers 5's {tied: source} mapping: the output
    embeddings' weight is tied to the input embeddings' weight (the only tying these models do)."""
    try:
        source = model.get_input_embeddings()
    except Exception:
        return {}
    for name, module in model.named_modules():
        if module is source:
            return {key: f"{name}.weight" for key in keys if key != f"{name}.weight"}
    return {}


# ---- rotary embeddings ----------------------------------------------------------------------------

def _rope_config_value(config, name: str, default=None):
    value = getattr(config, name, None)
    if value is None:
        params = getattr(config, "rope_parameters", None) or {}
        value = params.get(name) if isinstance(params, dict) else None
    return default if value is None else value


def _default_inv_freq(config, device=None) -> torch.Tensor | None:
    base = _rope_config_value(config, "rope_theta")
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if base is None or head_dim is None:
        return None
    dim = int(head_dim * _rope_config_value(config, "partial_rotary_factor", 1.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def _default_rope_init(config=None, device=None, seq_len=None, **rope_kwargs):
    """transformers 4's ``_compute_default_rope_parameters``: (inv_freq, attention scaling 1.0)."""
    _log("rope-default-init", type(config).__name__ if config is not None else "RotaryEmbedding")
    inv_freq = _default_inv_freq(config, device) if config is not None else None
    if inv_freq is None:
        base, dim = rope_kwargs["base"], rope_kwargs["dim"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim)), 1.0
    return inv_freq, 1.0


def repair_rotary_buffers(model: torch.nn.Module) -> int:
    """Recompute every plain-RoPE ``inv_freq`` buffer that is not finite or differs from its
    definition 1/theta^(2i/d); returns how many were replaced."""
    fixed = 0
    root_config = getattr(model, "config", None)
    for name, module in model.named_modules():
        buf = module._buffers.get("inv_freq") if hasattr(module, "_buffers") else None
        if buf is None or buf.device.type == "meta":
            continue
        if getattr(module, "rope_type", "default") not in ("default", None):
            continue  # scaled RoPE: no closed form here
        config = getattr(module, "config", None) or root_config
        expected = _default_inv_freq(config) if config is not None else None
        if expected is None or expected.shape != buf.shape:
            continue
        current = buf.detach().float().cpu()
        if bool(torch.isfinite(current).all()) and torch.allclose(current, expected, rtol=1e-3 if buf.dtype != torch.float32 else 1e-5, atol=0.0):
            continue
        new = expected.to(device=buf.device, dtype=buf.dtype)
        module._buffers["inv_freq"] = new
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.original_inv_freq = new
        scaling = getattr(module, "attention_scaling", None)
        if isinstance(scaling, float) and not scaling == scaling:  # NaN
            module.attention_scaling = 1.0
        fixed += 1
        _log("rotary-inv-freq", type(model).__name__)
    return fixed


# ---- generation configs ---------------------------------------------------------------------------

def _repair_generation_config_class(cls: type) -> list[str]:
    installed = []
    validate = cls.__dict__.get("validate")
    if validate is not None and not _marked(validate) and not _accepts(validate, "user_set_attributes"):

        @functools.wraps(validate)
        def _validate(self, *args, **kwargs):
            if kwargs:
                _log("generation-config-validate", cls.__name__)
            return _call_with_accepted(validate, self, args, kwargs)

        cls.validate = _mark(_validate)
        installed.append("generation-config-validate")

    current = getattr(cls, "from_model_config", None)
    if current is not None and not _marked(current) and hasattr(current, "__func__"):
        original = current.__func__

        @functools.wraps(original)
        def from_model_config(klass, model_config):
            try:
                return original(klass, model_config)
            except AttributeError:  # a field of the subclass looked up on a plain GenerationConfig()
                _log("generation-config-from-model", cls.__name__)
                return _generation_config_from_model_config(klass, model_config)

        cls.from_model_config = classmethod(_mark(from_model_config))
        installed.append("generation-config-from-model")
    return installed


def _generation_config_from_model_config(klass, model_config):
    """transformers 4's ``GenerationConfig.from_model_config``: the model config's non-None values."""
    config_dict = dict(model_config) if isinstance(model_config, dict) else model_config.to_dict()
    config_dict.pop("_from_model_config", None)
    config_dict = {key: value for key, value in config_dict.items() if value is not None}
    generation_config = klass.from_dict(config_dict, return_unused_kwargs=False, _from_model_config=True)
    try:
        generation_config._original_object_hash = hash(generation_config)
    except Exception:  # older transformers: no hash, nothing to record
        pass
    return generation_config


# ---- import repairs: modules and names transformers 5 removed ---------------------------------------

_MASK_MODULE = "transformers.modeling_attn_mask_utils"


def install_import_repairs() -> None:
    """Serve what published code imports from transformers 4 and this one lacks (idempotent, across copies)."""
    if importlib.util.find_spec(_MASK_MODULE) is None and not any(_marked(f) for f in sys.meta_path):
        sys.meta_path.append(_mark(_RemovedModuleFinder()))
    import transformers.utils.import_utils as import_utils

    if not hasattr(import_utils, "is_torch_fx_available"):
        import_utils.is_torch_fx_available = _mark(_is_torch_fx_available)


def _is_torch_fx_available() -> bool:
    """transformers 4: torch.fx is usable (always, with the torch transformers 5 needs)."""
    _log("torch-fx-available", "transformers.utils.import_utils")
    return True


class _RemovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Consulted after every other finder: answers only for the removed mask-utilities module."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname == _MASK_MODULE else None

    def create_module(self, spec):  # the default module object
        return None

    def exec_module(self, module) -> None:
        module.AttentionMaskConverter = AttentionMaskConverter
        module._prepare_4d_causal_attention_mask = _prepare_4d_causal_attention_mask
        module._prepare_4d_causal_attention_mask_for_sdpa = _prepare_4d_causal_attention_mask_for_sdpa
        _log("attn-mask-utils-module", _MASK_MODULE)


def _causal_mask(batch, query_length, past, dtype, device, sliding_window=None) -> torch.Tensor:
    """Additive ``[batch, 1, q, past + q]``: 0 where query i may see key j (j <= past + i), min elsewhere."""
    rows = torch.arange(query_length, device=device)[:, None] + past
    cols = torch.arange(past + query_length, device=device)[None, :]
    blocked = (cols > rows) | ((cols < rows - sliding_window) if sliding_window is not None else False)
    mask = torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)
    return mask[None, None].expand(batch, 1, query_length, past + query_length)


def _padding_mask(mask_2d: torch.Tensor, dtype, query_length=None) -> torch.Tensor:
    """Additive ``[batch, 1, q, k]`` from a 2-D keep mask (1 keep, 0 padding)."""
    batch, keys = mask_2d.shape
    inverted = 1.0 - mask_2d[:, None, None, :].expand(batch, 1, query_length or keys, keys).to(dtype)
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


class AttentionMaskConverter:
    """transformers 4's converter of 2-D masks to additive 4-D ones, as its mask helpers use it."""

    def __init__(self, is_causal: bool, sliding_window: int | None = None):
        self.is_causal, self.sliding_window = is_causal, sliding_window

    def to_causal_4d(self, batch_size, query_length, key_value_length, dtype=torch.float32, device="cpu"):
        if query_length > 1 or self.sliding_window is not None:
            return _causal_mask(batch_size, query_length, key_value_length - query_length, dtype, device,
                                self.sliding_window)
        return None

    def to_4d(self, attention_mask_2d, query_length, dtype, key_value_length=None):
        expanded = _padding_mask(attention_mask_2d, dtype, query_length).to(attention_mask_2d.device)
        if (query_length > 1 or self.sliding_window is not None) and self.is_causal:
            if key_value_length is None:
                raise ValueError("a causal 4-D mask needs key_value_length")
            causal = _causal_mask(attention_mask_2d.shape[0], query_length, key_value_length - query_length, dtype,
                                  attention_mask_2d.device, self.sliding_window)
            expanded = causal.masked_fill(expanded.bool(), torch.finfo(dtype).min)
        return expanded

    @staticmethod
    def _ignore_causal_mask_sdpa(attention_mask, inputs_embeds, past_key_values_length, sliding_window=None,
                                 is_training=False):
        """Whether SDPA can run without a mask: none given (or an all-ones 2-D one) and every query
        sees every key (one query, or no cache)."""
        query_length = inputs_embeds.shape[1]
        whole = query_length == 1 or past_key_values_length == 0
        in_window = sliding_window is None or query_length + past_key_values_length < sliding_window
        if attention_mask is None or attention_mask.dim() == 4 or not in_window:
            return attention_mask is None and whole and in_window
        return bool(torch.all(attention_mask == 1)) and whole

    @staticmethod
    def _unmask_unattended(expanded_mask, min_dtype):
        """Rows that attend to nothing attend to everything (what SDPA's memory-efficient path needs)."""
        return expanded_mask.mul(~torch.all(expanded_mask == min_dtype, dim=-1, keepdim=True))


def _prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length,
                                      sliding_window=None):
    """transformers 4: the additive causal 4-D mask (with padding) eager attention adds to its scores."""
    _log("attn-mask-utils-module", "_prepare_4d_causal_attention_mask")
    converter = AttentionMaskConverter(is_causal=True, sliding_window=sliding_window)
    key_value_length = input_shape[-1] + past_key_values_length
    dtype = inputs_embeds.dtype
    if attention_mask is not None and attention_mask.dim() == 2:
        return converter.to_4d(attention_mask, input_shape[-1], key_value_length=key_value_length, dtype=dtype)
    if attention_mask is not None and attention_mask.dim() == 4:
        if tuple(attention_mask.shape) != (input_shape[0], 1, input_shape[1], key_value_length):
            raise ValueError(f"Incorrect 4D attention_mask shape: {tuple(attention_mask.shape)}")
        inverted = 1.0 - attention_mask
        return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)
    return converter.to_causal_4d(input_shape[0], input_shape[-1], key_value_length, dtype=dtype,
                                  device=inputs_embeds.device)


def _prepare_4d_causal_attention_mask_for_sdpa(attention_mask, input_shape, inputs_embeds, past_key_values_length,
                                               sliding_window=None):
    """transformers 4: None when SDPA needs no mask, a 4-D mask given as is, else the additive causal mask."""
    _log("attn-mask-utils-module", "_prepare_4d_causal_attention_mask_for_sdpa")
    converter = AttentionMaskConverter(is_causal=True, sliding_window=sliding_window)
    key_value_length = input_shape[-1] + past_key_values_length
    dtype = inputs_embeds.dtype
    if AttentionMaskConverter._ignore_causal_mask_sdpa(attention_mask, inputs_embeds, past_key_values_length,
                                                       sliding_window):
        return None
    if attention_mask is None:
        return converter.to_causal_4d(input_shape[0], input_shape[-1], key_value_length, dtype=dtype,
                                      device=inputs_embeds.device)
    mask = attention_mask if attention_mask.dim() == 4 else converter.to_4d(
        attention_mask, input_shape[-1], dtype=dtype, key_value_length=key_value_length)
    if mask.device.type == "cuda":
        mask = AttentionMaskConverter._unmask_unattended(mask, torch.finfo(dtype).min)
    return mask


install_import_repairs()
