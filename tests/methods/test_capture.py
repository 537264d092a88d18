"""The shared capture (hooks) and registry: block inputs recorded by position or keyword, the forward
stopped at the hooked module, and one builder per config class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdlm_export.core.configs import WeightOnlyConfig
from qdlm_export.errors import ConfigError
from qdlm_export.families import family_by_name
from qdlm_export.methods import build_method, make_config
from qdlm_export.methods.capture import ForwardStopped, record_calls
from qdlm_export.methods.gptq import GPTQ


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden_states=None, scale=1.0):
        return self.linear(hidden_states) * scale


class _Model(nn.Module):
    """Calls its first block with the hidden states by position or by keyword, then a second one."""

    def __init__(self, by_keyword: bool):
        super().__init__()
        self.first, self.second = _Block(), _Block()
        self.by_keyword = by_keyword

    def forward(self, x):
        h = self.first(hidden_states=x, scale=2.0) if self.by_keyword else self.first(x, 2.0)
        return self.second(h)


@pytest.mark.parametrize("by_keyword", [False, True])
def test_record_calls_stops_the_forward_and_keeps_the_inputs(by_keyword):
    model = _Model(by_keyword)
    xs = [torch.randn(2, 3, 8) for _ in range(3)]
    ran_second = []
    model.second.register_forward_pre_hook(lambda m, args: ran_second.append(1))
    with record_calls(model.first, stop=True) as calls:
        for x in xs:
            with pytest.raises(ForwardStopped):
                model(x)
    assert not ran_second  # nothing after the hooked module ran
    assert all(torch.equal(a, b) for a, b in zip(calls.hidden, xs))
    if by_keyword:
        assert calls.call_kwargs == [{"scale": 2.0}] * 3 and calls.call_args == [()] * 3
    else:
        assert calls.call_args == [(2.0,)] * 3 and calls.call_kwargs == [{}] * 3
    replayed = model.first(calls.hidden[0], *calls.call_args[0], **calls.call_kwargs[0])
    torch.testing.assert_close(replayed, model.first.linear(xs[0]) * 2.0)
    with record_calls(model.first) as calls:  # without stop: the forward runs to the end
        model(xs[0])
    assert len(calls.hidden) == 1 and ran_second == [1]


def test_build_method_uses_the_config_class_and_refuses_others():
    adapter = family_by_name("dense-decoder")
    method = build_method(make_config("gptq", damp=0.05), adapter, {}, scale_dtype=torch.float16)
    assert isinstance(method, GPTQ) and method.scale_dtype == torch.float16 and method.config.damp == 0.05
    with pytest.raises(ConfigError, match="not the config of a registered method"):
        build_method(WeightOnlyConfig(), adapter, {})
    with pytest.raises(ConfigError, match="unknown method"):
        make_config("nope")
