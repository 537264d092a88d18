"""Calibration of the routed experts of mixture-of-experts layers, shared by the calibrated
weight-only methods (GPTQ, AWQ).

An expert's statistics come either from the tokens the router sent it ("routed", captured by hooks
on its linears during the block's forward) or from every token reaching the mixture-of-experts block
("all-tokens", llm-compressor's choice): the output of the norm every expert reads
(``LinearGroup.expert_input``) is captured once, and the expert's own module is run on all of it, so
that its ``down_proj`` sees that expert's activation of every token, computed by its own gate/up.
Nothing here knows a family: the adapter's expert template names the modules.

:func:`expert_plan` decides, per expert group, which statistics a method uses, and why when that is
a fallback (``CalibratedWeightOnlyConfig``: ``expert_calibration``, ``min_expert_tokens``,
``expert_fallback``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..core.configs import CalibratedWeightOnlyConfig
from ..families import LinearGroup
from .base import NO_ROUTED_TOKENS
from .capture import ForwardStopped

ROUTED, ALL_TOKENS, RTN = "routed", "all-tokens", "rtn"


def no_routed_tokens_reason(count: int, minimum: int) -> str:
    if count == 0:
        return NO_ROUTED_TOKENS
    return f"the router sent it {count} calibration tokens, fewer than min_expert_tokens={minimum}"


def expert_plan(config, group: LinearGroup, routed_tokens: int | None) -> tuple[str, str | None]:
    """(which statistics to use: ``routed``, ``all-tokens`` or ``rtn``; why, when a fallback).

    ``routed_tokens``: how many tokens the router sent the group's expert (None: not captured, i.e.
    all-tokens calibration was asked for). Dense groups are always ``routed`` (their own inputs)."""
    if not group.routed:
        return ROUTED, None
    options = config if isinstance(config, CalibratedWeightOnlyConfig) else CalibratedWeightOnlyConfig()
    if options.expert_calibration == ALL_TOKENS:
        return ALL_TOKENS, None
    count = routed_tokens or 0
    if count > 0 and count >= options.min_expert_tokens:
        return ROUTED, None
    reason = no_routed_tokens_reason(count, options.min_expert_tokens)
    if options.expert_fallback == ALL_TOKENS and group.expert_input is None:
        return RTN, reason  # nothing names the experts' input: only RTN is possible
    return options.expert_fallback, reason


def uses_routed_statistics(config, group: LinearGroup) -> bool:
    """Whether the group's routed inputs are captured (always, except under all-tokens calibration)."""
    return not (group.routed and getattr(config, "expert_calibration", ROUTED) == ALL_TOKENS)


class AllTokenInputs:
    """The inputs every expert of a block would see: per calibration batch, the output of the norm
    feeding the mixture-of-experts block, captured once per norm.

    Valid for one pass over a block's groups in forward order: the norm's output depends only on the
    linears before it, all of which are quantized before the first expert group is reached."""

    def __init__(self, block: nn.Module, calib):
        self.block, self.calib = block, calib
        self._captured: dict[str, list[torch.Tensor]] = {}

    @torch.no_grad()
    def of_norm(self, norm: str) -> list[torch.Tensor]:
        if norm not in self._captured:
            outputs: list[torch.Tensor] = []

            def hook(module, args, output):
                outputs.append((output[0] if isinstance(output, (tuple, list)) else output).detach())
                raise ForwardStopped

            handle = self.block.get_submodule(norm).register_forward_hook(hook)
            try:
                for i in range(len(self.calib)):
                    try:
                        self.calib.forward(self.block, i)
                    except ForwardStopped:
                        pass
            finally:
                handle.remove()
            self._captured[norm] = outputs
        return self._captured[norm]

    @torch.no_grad()
    def feed(self, group: LinearGroup, modules: dict[str, nn.Module],
             consume: Callable[[str, torch.Tensor], None]) -> None:
        """Run the group's expert on every token reaching the block and hand each named module's
        input (of the group's linears) to ``consume(name, x)``."""
        expert = self.block.get_submodule(group.expert)
        prefix = group.expert + "."
        handles = []
        for name, module in modules.items():
            def hook(mod, args, name=name):
                consume(name, args[0].detach())

            if not name.startswith(prefix):
                raise ValueError(f"{name} is not a linear of expert {group.expert}")
            handles.append(module.register_forward_pre_hook(hook))
        try:
            for x in self.of_norm(group.expert_input):
                expert(x.reshape(-1, x.shape[-1]))
        finally:
            for handle in handles:
                handle.remove()
