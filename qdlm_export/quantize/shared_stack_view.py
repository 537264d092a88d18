"""A second layer stack over the blocks' weights (:class:`~qdlm_export.families.base.SharedStack`),
as the quantize stage holds it: layer ``i`` of the shared stack computes with the very module objects
of block ``i`` wherever the two have the same module, so what a method does to block ``i`` (hooks,
folding in place, a replaced linear) is what the shared layer computes with -- as in the quantized
checkpoint, which stores the weights once and ties them at load."""

from __future__ import annotations

import torch.nn as nn

from ..families.base import FamilyAdapter

_SHARED = "_qdlm_shared_modules"  # on a shared layer: the names share_modules() made the block's


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _has_persistent_buffers(module: nn.Module) -> bool:
    # transformers ties weights, not buffers: a persistent buffer is each stack's own (a layer_scalar)
    return any(name not in m._non_persistent_buffers_set for m in module.modules() for name in m._buffers)


def share_modules(block: nn.Module, shared_layer: nn.Module) -> list[str]:
    """Make each parameter-owning submodule of ``shared_layer`` that has a same-named counterpart of the
    same type in ``block`` (and no persistent buffer of its own) that very counterpart, the outermost
    such module at each place (``mlp`` whole; ``self_attn.q_proj`` where the attention modules differ).
    Returns the names (relative to the layer) shared, in module order.

    Idempotent, and meant to be called again after a method replaced modules of ``block``: a name
    shared before follows the block's current module whatever its type."""
    before = getattr(shared_layer, _SHARED, frozenset())
    shared: list[str] = []

    def walk(mine: nn.Module, theirs: nn.Module, path: str) -> None:
        for name, child in list(theirs.named_children()):
            full = path + name
            counterpart = mine._modules.get(name)
            if counterpart is None:
                continue
            if counterpart is child:
                shared.append(full)
            elif full in before or (type(counterpart) is type(child) and _owns_parameters(child)
                                    and not _has_persistent_buffers(child)):
                setattr(theirs, name, counterpart)
                shared.append(full)
            elif _owns_parameters(child):
                walk(counterpart, child, full + ".")

    walk(block, shared_layer, "")
    object.__setattr__(shared_layer, _SHARED, frozenset(before | set(shared)))
    return shared


def shared_layer_prefix(adapter: FamilyAdapter, prefix: str) -> str | None:
    """The shared stack's layer computing with block ``prefix``'s weights (``<layers>.<i>`` for
    ``<blocks>.<i>``); None when ``prefix`` is not a block or the family has no shared stack."""
    stack, head = adapter.shared_stack, adapter.blocks + "."
    if stack is None or not prefix.startswith(head) or not prefix[len(head):].isdigit():
        return None
    return f"{stack.layers}.{prefix[len(head):]}"


def in_shared_layers(adapter: FamilyAdapter, name: str) -> bool:
    """Whether ``name`` lies in the shared stack's layers (materialised with their blocks)."""
    stack = adapter.shared_stack
    return stack is not None and (name == stack.layers or name.startswith(stack.layers + "."))


def share_counterpart(model: nn.Module, adapter: FamilyAdapter, prefix: str) -> str | None:
    """For a module of the shared stack outside its layers (the encoder's embeddings, final norm):
    make it the very module it is stored as (``SharedStack.stored_name``) when that module has the same
    type and no persistent buffer of its own; returns that module's name, else None."""
    stack = adapter.shared_stack
    stored = stack.stored_name(prefix) if stack is not None else None
    if stored is None or in_shared_layers(adapter, prefix):
        return None
    try:
        module, counterpart = model.get_submodule(prefix), model.get_submodule(stored)
    except AttributeError:
        return None
    if module is not counterpart and (type(module) is not type(counterpart) or _has_persistent_buffers(module)):
        return None
    parent, _, leaf = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, counterpart)
    return stored
