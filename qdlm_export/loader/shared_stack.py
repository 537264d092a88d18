"""A second layer stack over the stored quantized modules (``quantization_config.shared_stack``):
DiffusionGemma's causal encoder ``model.encoder.language_model`` computes with the decoder's layers'
weights, which the checkpoint stores once, under ``model.decoder``.

transformers ties the two stacks parameter by parameter (``_tied_weights_keys``: the encoder's
``...weight``, ``...gate_up_proj`` ... are the decoder's). A quantized module has no such parameters,
so the loader ties modules instead: the alias stack's module of a quantized module *is* the stored
one. While the weights load the alias modules are detached (``None`` in their parent: no state-dict
entries, so transformers neither reports them missing nor fills them with empty memory), the tie
entries naming tensors that no longer exist are dropped, and after loading each alias is bound to its
stored module (:func:`bind_aliases`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..format.spec import shared_stack_prefixes


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def detach_aliases(model: nn.Module, qconfig: dict[str, Any], names: Iterable[str],
                   local: Callable[[str], str]) -> list[tuple[str, str]]:
    """Detach the alias of every module ``names`` lists (checkpoint names of quantized modules, before
    they are replaced) that lies under the shared stack's stored prefix and has an alias in ``model``.
    Returns ``(alias path, stored path)`` pairs, in the model's names, for :func:`bind_aliases`."""
    prefixes = shared_stack_prefixes(qconfig)
    if prefixes is None:
        return []
    alias_prefix, stored_prefix = prefixes
    pairs = []
    for name in names:
        if not name.startswith(stored_prefix):
            continue
        alias, stored = local(alias_prefix + name[len(stored_prefix):]), local(name)
        try:
            twin = model.get_submodule(alias)
        except AttributeError:
            continue  # a module of the stored stack alone (none of DiffusionGemma's quantized ones)
        original = model.get_submodule(stored)
        if type(twin) is not type(original) or _shapes(twin) != _shapes(original):
            raise CheckpointError(
                f"{alias} should compute with {stored}'s quantized weights (quantization_config.shared_stack), but "
                f"it is a {type(twin).__name__} with {_shapes(twin)}, not a {type(original).__name__} with "
                f"{_shapes(original)}", hint="the checkpoint's config.json does not match its modeling code")
        parent, _, child = alias.rpartition(".")
        model.get_submodule(parent)._modules[child] = None
        pairs.append((alias, stored))
    return pairs


def bind_aliases(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> None:
    """Each alias becomes its stored module, the same object (after the weights loaded)."""
    for alias, stored in pairs:
        parent, _, child = alias.rpartition(".")
        setattr(model.get_submodule(parent), child, model.get_submodule(stored))


def prune_tied_keys(model: nn.Module) -> list[str]:
    """Drop the tie entries (``all_tied_weights_keys`` of the model and its sub-models) whose target or
    source is no longer a parameter or buffer: a replaced linear's ``weight``, a fused module's 3-D
    parameters. transformers would otherwise look them up while tying and fail. Returns the targets dropped."""
    dropped = []
    for module in model.modules():
        tied = getattr(module, "all_tied_weights_keys", None)
        if not isinstance(tied, dict) or not tied:
            continue
        names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        names |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
        for target, source in list(tied.items()):
            if target not in names or source not in names:
                del tied[target]
                dropped.append(target)
    return dropped
