"""Recording what modules receive during a forward pass, with hooks: the one capture every method and
the pipeline use.

* :func:`record_calls` -- the positional and keyword arguments a module is called with (the pipeline
  captures block 0's inputs this way; fidelity captures every block's), optionally stopping the
  forward at the first call so nothing after the module runs.
* :func:`feed_inputs` -- run a block on calibration batches and hand each named submodule's input to
  a consumer; each batch's forward stops once every named module has had its input, so collecting a
  group's inputs never runs the rest of the block (nor, for the LM head, the vocabulary projection).
* :class:`LinearOutputMemo` -- the outputs of a block's linears per calibration batch, so that a
  later pass over the same batch recomputes only from the first linear whose weight changed since.
"""

from __future__ import annotations

from collections.abc import Iterable
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


class _PlaceholderRead(Exception):
    """A captured input was computed from a placeholder output: the pass must run again for real."""


@torch.no_grad()
def feed_inputs(block: nn.Module, modules: dict[str, nn.Module], calib,
                consume: Callable[[str, torch.Tensor], None]) -> dict[str, int]:
    """Run ``block`` on every batch of ``calib`` (a :class:`~qdlm_export.methods.base.BlockCalibration`)
    and hand each named module's input to ``consume(name, x)``. Returns how many batches reached each
    module (a module the forward never calls gets 0).

    With a memo of linear outputs (``calib.memo``), a named linear whose input has been taken returns
    a shape-only placeholder instead of computing its output (q and k need not run once the pass is
    only waiting for v's input). A placeholder holds no values, so anything computed from one is a
    placeholder too, or an error: a pass in which a taken input is a placeholder, or which fails, runs
    again with every output computed. A batch's inputs are handed on once its pass has succeeded."""
    seen: dict[str, int] = {name: 0 for name in modules}
    pending: set[str] = set()
    taken: list[tuple[str, torch.Tensor]] = []

    def pre_hook(name):
        def hook(module, args):
            x = args[0].detach()
            if x.is_meta:
                raise _PlaceholderRead(name)
            taken.append((name, x))
            pending.discard(name)
            if not pending:
                raise ForwardStopped

        return hook

    def run(index: int) -> bool:
        """One pass over batch ``index``; whether it stopped once every module had its input."""
        pending.update(modules)
        taken.clear()
        try:
            calib.forward(block, index)
        except ForwardStopped:
            return True
        return False

    memo = getattr(calib, "memo", None)
    handles = [module.register_forward_pre_hook(pre_hook(name)) for name, module in modules.items()]
    try:
        for i in range(len(calib)):
            if memo is None:
                run(i)
            else:
                given = memo.placeholders_given
                try:
                    with memo.placeholders(modules.values()):
                        # A pass that ran to its end may have skipped a module for a placeholder's sake
                        # (a routed expert whose router read one): it too runs again for real.
                        again = not run(i) and memo.placeholders_given > given
                except Exception:  # a placeholder reached something that needs values
                    again = True
                if again:
                    run(i)
            for name, x in taken:
                consume(name, x)
                seen[name] += 1
            taken.clear()
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


# What a memo may hold when its user names no budget (the pipeline gives a quarter of the memory
# available: ``quantize.pipeline.memo_budget``). Beyond the budget, batches compute as without a memo.
MEMO_BUDGET_BYTES = 1 << 30


@dataclass
class _RecordedCall:
    module: nn.Module
    epoch: int  # the sum of the weight epochs of the linears in ``module`` when it was called
    input_shape: tuple | None  # of the call's first tensor argument
    output: Any = None  # what the call returned, when kept
    versions: tuple[int, ...] = ()  # the output tensors' version counters when kept
    span: int | None = None  # memoised calls made inside this one; None until it returned
    nbytes: int = 0


def _output_tensors(output: Any) -> list[torch.Tensor] | None:
    """The tensors of a module's output when it is a tensor or a tuple/list of tensors and Nones (what
    the memo can hand back again); None for anything else."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    if not all(item is None or isinstance(item, torch.Tensor) for item in items):
        return None
    return [item for item in items if item is not None]


def _first_tensor_shape(args: tuple, kwargs: dict) -> tuple | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return None


class LinearOutputMemo:
    """The outputs of a block's linears, and of the submodules holding them (attention, MLP), recorded
    per calibration batch, so that a pass over the same batch reuses them instead of recomputing them.
    True-sequential GPTQ runs a block once per group of linears and once more to carry the quantized
    outputs on, and each of those passes repeats everything before the group just quantized: with the
    memo, each linear of the block runs once per batch, and an attention whose linears are all
    quantized runs once more, not once per later pass.

    Why a recorded output can be reused: a pass over batch ``i`` runs the same (deterministic) forward
    on the same inputs as the previous pass over it, so it makes the same calls in the same order, with
    the same inputs, up to the first call of a linear whose weight changed since (:meth:`changed`). Up
    to that call, each call returns what it returned before; from that call on, everything is computed
    and recorded afresh. A submodule that holds a changed linear, or whose output was not kept, runs
    again, its own calls still reused up to the changed linear. A submodule with hooks inside (a
    capture waiting for an input there) runs too, so that the hooks fire. A call that does not match
    what was recorded (another module, another input shape), or whose recorded output the forward
    modified in place (a version counter moved), ends the reuse for the rest of the pass. Outputs are
    kept while the memo holds at most ``budget_bytes``; beyond, passes compute as without it.

    Only a method whose passes change nothing in the block but linear weights, and which reports
    every such change with :meth:`changed`, may use one (``QuantMethod.reuses_linear_outputs``).
    Outside :meth:`batch`, the modules compute as usual."""

    def __init__(self, block: nn.Module, budget_bytes: int | None = None):
        self.linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        self._linears_in: dict[int, list[int]] = {id(m): [id(m)] for m in self.linears}
        self._inside: dict[int, list[nn.Module]] = {}  # the submodules of each holder of linears
        self.modules: list[nn.Module] = list(self.linears)
        for module in block.modules():
            if module is block or isinstance(module, nn.Linear):
                continue
            inner = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if inner:  # a submodule holding linears: attention, MLP, an expert
                self.modules.append(module)
                self._linears_in[id(module)] = [id(m) for m in inner]
                # (its own hooks run whether or not the memo answers: only those inside matter)
                self._inside[id(module)] = [m for m in module.modules() if m is not module]
        self.budget_bytes = MEMO_BUDGET_BYTES if budget_bytes is None else budget_bytes
        self.held_bytes = 0
        self.reused = self.computed = 0  # linear calls answered from the memo / by the linear, in batches
        self.placeholders_given = 0
        self._epoch = {id(m): 0 for m in self.linears}
        self._recorded: dict[int, list[_RecordedCall]] = {}
        self._batch: int | None = None
        self._position = 0
        self._reusing = False
        self._placeholder_for: set[int] = set()
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> LinearOutputMemo:
        for module in self.modules:
            self._saved[id(module)] = module.__dict__.get("forward")  # an instance-level forward to restore
            module.forward = self._wrap(module, module.forward)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            saved = self._saved.pop(id(module), None)
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        self._recorded.clear()
        self.held_bytes = 0

    def changed(self, modules: Iterable[nn.Module]) -> None:
        """``modules`` now compute with other weights: outputs they recorded are stale."""
        for module in modules:
            if id(module) in self._epoch:
                self._epoch[id(module)] += 1

    @contextmanager
    def batch(self, index: int) -> Iterator[None]:
        """The block's modules, inside the ``with`` body, run a pass over calibration batch ``index``."""
        self._batch, self._position, self._reusing = index, 0, True
        try:
            yield
        finally:
            self._batch = None

    @contextmanager
    def placeholders(self, modules: Iterable[nn.Module]) -> Iterator[None]:
        """Inside the ``with`` body, a call of one of ``modules`` (linears) that the memo cannot answer
        returns an uninitialised ``meta`` tensor of the output's shape instead of computing
        (``feed_inputs``: the caller has taken the module's input and does not need its output)."""
        self._placeholder_for = {id(m) for m in modules}
        try:
            yield
        finally:
            self._placeholder_for = set()

    def _wrap(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def memoized(*args, **kwargs):
            if self._batch is None:
                return forward(*args, **kwargs)
            return self._call(module, forward, args, kwargs)

        return memoized

    def _call(self, module: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        recorded = self._recorded.setdefault(self._batch, [])
        position = self._position
        self._position += 1
        shape = _first_tensor_shape(args, kwargs)
        epoch = sum(self._epoch[i] for i in self._linears_in[id(module)])
        holder = id(module) in self._inside
        if self._reusing and position < len(recorded):
            entry = recorded[position]
            if entry.module is module and entry.input_shape == shape and shape is not None:
                if self._reusable(entry, epoch, module):
                    self._position += entry.span
                    if not holder:
                        self.reused += 1
                    return entry.output
                if holder:  # run it again; the calls inside may still be answered
                    self._forget(entry)
                    entry.epoch = epoch
                    return self._run(module, forward, args, kwargs, recorded, position, entry)
        if self._reusing:  # from here on this pass differs from the recorded one
            self._reusing = False
            for entry in recorded[position:]:
                self._forget(entry)
            del recorded[position:]
        if (not holder and id(module) in self._placeholder_for and len(args) == 1 and not kwargs
                and isinstance(module, nn.Linear)):
            self.placeholders_given += 1
            x = args[0]
            return torch.empty((*x.shape[:-1], module.out_features), dtype=x.dtype, device="meta")
        entry = None
        if shape is not None and len(recorded) == position:
            entry = _RecordedCall(module, epoch, shape)
            recorded.append(entry)
        return self._run(module, forward, args, kwargs, recorded, position, entry)

    def _reusable(self, entry: _RecordedCall, epoch: int, module: nn.Module) -> bool:
        if entry.span is None or entry.epoch != epoch or entry.output is None:
            return False
        if tuple(t._version for t in _output_tensors(entry.output) or ()) != entry.versions:
            return False
        # A capture's hooks inside must fire: run the submodule rather than answer for it.
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self._inside.get(id(module), ()))

    def _forget(self, entry: _RecordedCall) -> None:
        self.held_bytes -= entry.nbytes
        entry.output, entry.versions, entry.span, entry.nbytes = None, (), None, 0

    def _run(self, module, forward, args, kwargs, recorded, position, entry) -> Any:
        output = forward(*args, **kwargs)
        if isinstance(module, nn.Linear):
            self.computed += 1
        if entry is None or position >= len(recorded) or recorded[position] is not entry:
            return output
        entry.span = self._position - position - 1
        tensors = _output_tensors(output)
        if tensors is not None and tensors and not any(t.is_meta for t in tensors):
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            if self.held_bytes + nbytes <= self.budget_bytes:
                entry.output, entry.versions, entry.nbytes = output, tuple(t._version for t in tensors), nbytes
                self.held_bytes += nbytes
        return output
