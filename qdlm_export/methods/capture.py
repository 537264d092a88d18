"""Recording what modules receive during a forward pass, with hooks: the one capture every method and
the pipeline use.

* :func:`record_calls` -- the positional and keyword arguments a module is called with (the pipeline
  captures block 0's inputs this way; fidelity captures every block's), optionally stopping the
  forward at the first call so nothing after the module runs.
* :func:`feed_inputs` -- run a block on calibration batches and hand each named submodule's input to
  a consumer; each batch's forward stops once every named module has had its input, so collecting a
  group's inputs never runs the rest of the block (nor, for the LM head, the vocabulary projection).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator

import torch
import torch.nn as nn


class ForwardStopped(Exception):
    """Raised by a capture hook to end a forward pass once what it needed has been recorded."""


@dataclass
class RecordedCalls:
    """Per call of the hooked module: its first argument (the hidden states) and the other arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    call_args: list[tuple] = field(default_factory=list)
    call_kwargs: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def record_calls(module: nn.Module, *, stop: bool = False) -> Iterator[RecordedCalls]:
    """Record every call of ``module`` inside the ``with`` body. With ``stop``, the call raises
    :class:`ForwardStopped` before ``module`` runs (catch it around each forward); models that pass
    the hidden states by keyword (``hidden_states=``) are recorded the same way."""
    record = RecordedCalls()

    def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        if args:
            hidden, args = args[0], tuple(args[1:])
        else:
            hidden = kwargs.pop("hidden_states")
        record.hidden.append(hidden)
        record.call_args.append(args)
        record.call_kwargs.append(kwargs)
        if stop:
            raise ForwardStopped

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


@torch.no_grad()
def feed_inputs(block: nn.Module, modules: dict[str, nn.Module], calib,
                consume: Callable[[str, torch.Tensor], None]) -> dict[str, int]:
    """Run ``block`` on every batch of ``calib`` (a :class:`~qdlm_export.methods.base.BlockCalibration`)
    and hand each named module's input to ``consume(name, x)``. Returns how many batches reached each
    module (a module the forward never calls gets 0)."""
    seen: dict[str, int] = {name: 0 for name in modules}
    pending: set[str] = set()

    def pre_hook(name):
        def hook(module, args):
            consume(name, args[0].detach())
            seen[name] += 1
            pending.discard(name)
            if not pending:
                raise ForwardStopped

        return hook

    handles = [module.register_forward_pre_hook(pre_hook(name)) for name, module in modules.items()]
    try:
        for i, h in enumerate(calib.hidden):
            pending.update(modules)
            args = calib.call_args[i] if calib.call_args else ()
            kwargs = calib.call_kwargs[i] if calib.call_kwargs else {}
            try:
                block(h, *args, **kwargs)
            except ForwardStopped:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def require_inputs(seen: dict[str, int], may_be_silent: Collection[str] = ()) -> None:
    """Refuse a capture in which a listed module never received an input, except ``may_be_silent``
    ones (routed experts: the router may send them no token)."""
    silent = [name for name, count in seen.items() if count == 0 and name not in may_be_silent]
    if silent:
        raise RuntimeError(
            f"linear(s) {', '.join(silent)} saw no input while the block ran on the calibration data; "
            "the family adapter lists a linear the block's forward does not call"
        )
