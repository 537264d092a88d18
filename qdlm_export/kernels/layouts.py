"""What the kernel backends make from a checkpoint's tensors and hold beside them.

Each cache here is keyed by a packed weight tensor (the module's parameter) and lives as long as it
does; an entry records :func:`tensors_key` of the tensors it was made from, and is made again when
they change (in place, or by a ``.data`` swap).

* :class:`LayoutCache`: the one cache of such things (the CPU backends' repacked codes, tinygemm's
  layout, the group-major scales below, the launch plans).
* :func:`group_major_qparams`: the scales and zero points the Triton GEMMs read inside their K loops.
* :class:`LaunchPlans`: what a Triton launcher computes per weight and kind of call.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch

from .tuned import generation as tuned_generation


def tensors_key(*tensors: torch.Tensor | None) -> tuple:
    """What identifies the current contents of ``tensors`` for a cache of layouts made from them:
    data pointer, version counter and shape each (inference tensors track no version counter and
    cannot change in place: 0 stands for them)."""
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version, tuple(t.shape)) if t is not None else None
                 for t in tensors)


class LayoutCache:
    """What a backend makes from a checkpoint weight (repacked codes, scales in its own layout), one
    entry per packed tensor: held until that tensor is freed (a weak reference's callback drops it), so
    it goes with the module, and replaced when made again. Entries carry ``key`` (from
    :func:`tensors_key`) and ``nbytes``.

    Looked up on every forward of every layer, so by ``id`` in a plain dict (about 0.1 us; torch's
    ``WeakIdKeyDictionary`` makes a weak reference per lookup, about 0.9 us). An ``id`` is not reused
    before its object is freed, and freeing runs the callback first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, weight_packed: torch.Tensor):
        held = self._entries.get(id(weight_packed))
        return held[1] if held is not None and held[0]() is weight_packed else None

    def current(self, weight_packed: torch.Tensor, key: tuple):
        """The entry of ``weight_packed`` if it was made from the tensors ``key`` names, else None."""
        entry = self.get(weight_packed)
        return entry if entry is not None and entry.key == key else None

    def put(self, weight_packed: torch.Tensor, entry):
        ident, entries = id(weight_packed), self._entries

        def drop(ref: weakref.ref) -> None:  # the tensor is being freed
            if entries.get(ident, (None,))[0] is ref:
                entries.pop(ident, None)

        with self._lock:
            entries[ident] = (weakref.ref(weight_packed, drop), entry)
        return entry

    def forget(self, weight_packed: torch.Tensor) -> None:
        with self._lock:
            if self.get(weight_packed) is not None:
                self._entries.pop(id(weight_packed), None)

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self, weight_packed: torch.Tensor) -> int:
        """Bytes held beside ``weight_packed`` (0 before its layout is made)."""
        entry = self.get(weight_packed)
        return 0 if entry is None else entry.nbytes


class _Plans:
    nbytes = 0  # plans point at the module's scales and bias and at the group-major copies held above

    def __init__(self, key: tuple) -> None:
        self.key, self.by_call = key, {}


class LaunchPlans:
    """What a Triton launcher computes for a weight and one kind of call (token count, activation
    dtype): grid, tile configuration, the scales' arguments and strides. At 16 tokens a GPU computes
    a 4096 x 4096 layer in less time than the Python around its launch took, so the launchers make
    this once and keep it beside the weight (a :class:`LayoutCache` entry), under a key naming what it
    was made from (:func:`tensors_key` of the weight's tensors, the launcher's facts and the tuned
    tables' generation): an edited or swapped tensor, or a table read again, makes new plans. A weight
    keeps the plans of at most ``limit`` kinds of call (a sampler's few block lengths), then starts
    over. A plan must not hold the packed weight or a view of it: held beside that tensor, it would
    keep it alive for good."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._held = LayoutCache()

    def get(self, weight_packed: torch.Tensor, tensors: tuple, facts: tuple, call: tuple, make: Callable[[], Any]):
        """The plan for ``call`` against ``weight_packed`` and the other ``tensors`` it is computed with:
        the held one, or ``make()``'s, held unless made during CUDA-graph capture."""
        key = (tensors_key(weight_packed, *tensors), facts, tuned_generation())
        plans = self._held.current(weight_packed, key)
        plan = plans.by_call.get(call) if plans is not None else None
        if plan is None:
            plan = make()
            if not capturing(weight_packed):
                if plans is None:
                    plans = self._held.put(weight_packed, _Plans(key))
                if len(plans.by_call) >= self.limit:
                    plans.by_call.clear()
                plans.by_call[call] = plan
        return plan

    def held(self, weight_packed: torch.Tensor) -> int:
        """How many plans ``weight_packed`` holds (tests)."""
        plans = self._held.get(weight_packed)
        return 0 if plans is None else len(plans.by_call)


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is capturing a CUDA graph (what is made then is the graph's: not held)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class _GroupMajor:
    def __init__(self, scale: torch.Tensor, zero: torch.Tensor | None, key: tuple):
        self.scale, self.zero, self.key = scale, zero, key

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.scale, self.zero) if t is not None)


_GROUP_MAJOR = LayoutCache()


def group_major_qparams(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales in float32 and the zero points in int32, stored group-major (``[..., groups, N]``,
    ``N`` contiguous) and returned as ``[..., N, groups]`` views of that storage, the checkpoint's
    index order; made once per weight and held beside it. Per-channel parameters come back as given.

    Why: the Triton GEMMs read one group's scales for a tile of ``BLOCK_N`` output rows in every K
    step. In the checkpoint's ``[N, groups]`` rows those are ``groups`` elements apart and 2 bytes
    each, and Triton's software pipeliner copies a load ahead (``cp.async``) only with 4 contiguous
    bytes a thread or more: the load stayed in the loop, an L2 round trip before each MMA, and held
    90-150 registers a thread more on sm_90 (``benchmarks/triton_compile_check.py``, its "loads in loop").
    Group-major float32 rows are copied ahead with the weight words. The cost: 4 bytes a group per
    output row beside the checkpoint's 2, 8 with zero points (``nbytes``; at 4 bits g128, 1.6 % or
    3.1 % of the bf16 weight's bytes, 6 % or 12 % of the 4-bit checkpoint's).

    The copy follows the checkpoint tensors by :func:`tensors_key` (data pointer, version counter and
    shape, checked per call; not the contents): an edit that bypasses the version counter
    (``scale.data.mul_()``, or an inference tensor changed inside ``inference_mode``) is not seen. A
    first call inside CUDA-graph capture makes a copy the graph owns and holds none (a held copy made
    there would only be written on replay)."""
    if weight_scale.shape[-1] == 1:  # one group: read once per tile, outside the K loop
        return weight_scale, weight_zero_point
    key = tensors_key(weight_scale, weight_zero_point)
    hit = _GROUP_MAJOR.current(weight_packed, key)
    if hit is None:
        def group_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return t.to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)

        zero = None if weight_zero_point is None else group_major(weight_zero_point, torch.int32)
        made = _GroupMajor(group_major(weight_scale, torch.float32), zero, key)
        if capturing(weight_scale):
            return made.scale, made.zero
        hit = _GROUP_MAJOR.put(weight_packed, made)
    return hit.scale, hit.zero


group_major_nbytes = _GROUP_MAJOR.nbytes  # bytes held beside a weight for the Triton GEMMs (0 before)
