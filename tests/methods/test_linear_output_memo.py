"""The memo of linear outputs between passes over a block (``capture.LinearOutputMemo``): a pass
reuses what a linear returned before only while every earlier call matches the previous pass, and
computes from the first changed linear on; true-sequential GPTQ with it writes exactly the checkpoint
it writes without it, while running each linear of a block about once per batch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.fixtures import build_tiny_model, build_tiny_moe_model
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma
from qdlm_export.methods.base import BlockCalibration
from qdlm_export.methods.capture import ForwardStopped, LinearOutputMemo, feed_inputs
from qdlm_export.methods.gptq import GPTQ
from qdlm_export.quantize.api import make_config, quantize


class _Chain(nn.Module):
    """Three linears in a row with a nonlinearity between; ``in_place`` scales the first linear's
    output in place, as some published forwards do with a projection's output."""

    def __init__(self, width: int = 16, in_place: bool = False):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(width, width) for _ in range(3))
        self.in_place = in_place

    def forward(self, x, scale=1.0):
        y = self.a(x)
        if self.in_place:
            y.mul_(scale)
        return self.c(torch.tanh(self.b(torch.relu(y)))) * scale


def _plain(block: nn.Module, calib: BlockCalibration) -> list[torch.Tensor]:
    """The block's outputs computed without any memo, in float64 on copies of the weights."""
    ref = _Chain(in_place=block.in_place).double()
    ref.load_state_dict({k: v.double() for k, v in block.state_dict().items()})
    return [ref(h.double(), *calib.call_args[i]) for i, h in enumerate(calib.hidden)]


def _calib(batches: int = 3) -> BlockCalibration:
    return BlockCalibration(hidden=[torch.randn(2, 5, 16) for _ in range(batches)],
                            call_args=[(float(torch.empty(()).uniform_(0.5, 2.0)),) for _ in range(batches)])


def _requantize(linear: nn.Linear) -> None:
    linear.weight.data = linear.weight.data + 0.1 * torch.randn_like(linear.weight)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_pass_reuses_outputs_up_to_the_first_changed_linear(in_place):
    block, calib = _Chain(in_place=in_place), _calib()
    with calib.reusing_linear_outputs(block) as memo:
        first = calib.run(block)
        assert (memo.reused, memo.computed) == (0, 9)
        _requantize(block.b)
        calib.linears_changed([block.b])
        second = calib.run(block)
        if in_place:  # a's recorded output was changed in place, so nothing after it can be trusted
            assert (memo.reused, memo.computed) == (0, 18)
        else:  # a reused; b changed, so b and c computed
            assert (memo.reused, memo.computed) == (3, 15)
        third = calib.run(block)  # nothing changed since
        assert memo.reused == (0 if in_place else 3 + 9)
    expected = _plain(block, calib)
    for got, want in zip(second, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(s, t) for s, t in zip(second, third))
    assert not any(torch.equal(f, s) for f, s in zip(first, second))
    assert all("forward" not in m.__dict__ for m in (block.a, block.b, block.c))  # unwrapped on exit
    assert memo.held_bytes == 0


def test_an_unreported_change_is_not_seen_which_is_why_methods_must_report():
    """The negative control: the memo really answers from its record (a method that changed a weight
    without ``linears_changed`` would get the old outputs)."""
    block, calib = _Chain(), _calib()
    with calib.reusing_linear_outputs(block):
        before = calib.run(block)
        _requantize(block.b)
        stale = calib.run(block)
    assert all(torch.equal(x, y) for x, y in zip(before, stale))
    fresh = calib.run(block)
    assert not any(torch.equal(x, y) for x, y in zip(before, fresh))


def test_a_pass_stopped_early_after_a_change_drops_what_it_did_not_recompute():
    block, calib = _Chain(), _calib()
    with calib.reusing_linear_outputs(block) as memo:
        calib.run(block)
        _requantize(block.a)
        calib.linears_changed([block.a])
        feed_inputs(block, {"c": block.c}, calib, lambda name, x: None)  # stops before c runs
        assert memo.computed == 9 + 6
        _requantize(block.b)
        calib.linears_changed([block.b])
        outputs = calib.run(block)
        assert memo.reused == 3 and memo.computed == 9 + 6 + 6
    for got, want in zip(outputs, _plain(block, calib)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


class _Bypass(nn.Module):
    """``b`` reads ``a``'s output (``feed`` "tensor") or ``a``'s output meets a CPU tensor before ``b``
    runs (``feed`` "mix"): either way a placeholder for ``a`` cannot stand in for its output."""

    def __init__(self, feed: str, width: int = 16):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.feed = feed
        self.register_buffer("shift", torch.randn(width))

    def forward(self, x, scale=1.0):
        y = self.a(x)
        if self.feed == "tensor":
            return self.b(torch.relu(y)) * scale
        z = y * self.shift  # a meta tensor and a CPU tensor: an error
        return (self.b(x) + z) * scale


class _GateUp(nn.Module):
    """Two linears reading one input, their product into a third (a gated MLP)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x, scale=1.0):
        return self.down(torch.tanh(self.gate(x)) * self.up(x)) * scale


@pytest.mark.parametrize("feed", ["tensor", "mix"])
def test_a_capture_that_needs_a_placeholders_values_runs_again_for_real(feed):
    block, calib = _Bypass(feed), _calib()
    taken: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    with calib.reusing_linear_outputs(block) as memo:
        seen = feed_inputs(block, {"a": block.a, "b": block.b}, calib, lambda name, x: taken[name].append(x))
    assert seen == {"a": 3, "b": 3} and memo.computed >= 3
    for i, h in enumerate(calib.hidden):
        assert torch.equal(taken["a"][i], h)
        expected_b = torch.relu(block.a(h)) if feed == "tensor" else h
        torch.testing.assert_close(taken["b"][i], expected_b)
        assert not taken["b"][i].is_meta


def test_placeholders_stand_in_for_outputs_nobody_reads():
    block, calib = _GateUp(), _calib()
    taken: list[tuple[str, torch.Tensor]] = []
    with calib.reusing_linear_outputs(block) as memo:
        feed_inputs(block, {"gate": block.gate, "up": block.up}, calib, lambda name, x: None)
        assert memo.computed == 0  # the pass stops at up's input; gate's output was never needed
        feed_inputs(block, {"down": block.down}, calib, lambda name, x: taken.append(x))
        assert memo.computed == 3 * 2
    for x, h in zip(taken, calib.hidden):
        torch.testing.assert_close(x, torch.tanh(block.gate(h)) * block.up(h))


def test_over_budget_batches_compute_as_without_a_memo():
    block, calib = _Chain(), _calib(batches=4)
    one_batch = 3 * 2 * 5 * 16 * 4  # three outputs of [2, 5, 16] float32
    with calib.reusing_linear_outputs(block, budget_bytes=one_batch + one_batch // 3) as memo:
        calib.run(block)
        assert memo.held_bytes == one_batch + one_batch // 3
        outputs = calib.run(block)
        assert memo.reused == 3 + 1  # batch 0 whole, batch 1 its first linear
    for got, want in zip(outputs, _plain(block, calib)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_outside_a_batch_linears_compute_as_usual():
    block, calib = _Chain(), _calib()
    with LinearOutputMemo(block) as memo:
        x = torch.randn(3, 16)
        torch.testing.assert_close(block.a(x), x @ block.a.weight.T + block.a.bias)
        with memo.batch(0):
            block.a(x)
            with pytest.raises(ForwardStopped):
                with memo.batch(1):
                    raise ForwardStopped
        assert memo.computed == 1 and memo._batch is None


# ---- GPTQ end to end: the same checkpoint, each linear run about once -----------------------------


def _tensors(folder) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _build(kind: str, folder):
    if kind in ("llada", "dream"):
        return build_tiny_model(kind, folder, seed=3, num_layers=2), True
    if kind == "lladamoe":
        return build_tiny_moe_model(kind, folder, seed=3, num_layers=2), True
    return build_tiny_diffusion_gemma(folder, seed=3, num_layers=2), False


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("kind", ["llada", "dream", "lladamoe", "diffusion_gemma"])
def test_gptq_writes_the_same_checkpoint_with_and_without_the_memo(kind, tmp_path, monkeypatch):
    src, remote = _build(kind, tmp_path / "src")
    calibration = CalibrationConfig(nsamples=12, seqlen=32, seed=1)
    config = make_config("gptq", bits=3, group_size=32)
    memos: list[LinearOutputMemo] = []
    exit_memo = LinearOutputMemo.__exit__

    def keep(self, *exc):
        memos.append(self)
        return exit_memo(self, *exc)

    monkeypatch.setattr(LinearOutputMemo, "__exit__", keep)
    quantize(str(src), tmp_path / "memo", config, calibration=calibration, trust_remote_code=remote,
             verify=False, device="cpu", batch_size=4)
    monkeypatch.setattr(GPTQ, "reuses_linear_outputs", False)
    quantize(str(src), tmp_path / "plain", config, calibration=calibration, trust_remote_code=remote,
             verify=False, device="cpu", batch_size=4)
    with_memo, without = _tensors(tmp_path / "memo"), _tensors(tmp_path / "plain")
    assert with_memo.keys() == without.keys()
    different = [k for k in with_memo if not torch.equal(with_memo[k], without[k])]
    assert not different, different
    assert len(memos) == 2 and all(memo.reused > 0 for memo in memos)
    if kind == "llada":
        # Per batch (3 of them) each of the 7 linears runs once, with its quantized weight (q and k,
        # whose inputs are taken before v's, answer with placeholders while their stage is captured).
        # The last block's ff_out never runs: nothing reads that block's outputs.
        assert len(memos[0].linears) == 7
        assert memos[0].computed == 3 * 7 and memos[1].computed == 3 * 6


class _Routed(nn.Module):
    """A linear whose output decides (by value) whether the next one runs: with a placeholder the
    forward would end without reaching it."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.router, self.expert = nn.Linear(width, 1), nn.Linear(width, width)

    def forward(self, x, scale=1.0):
        hit = torch.isfinite(self.router(x))  # real values: every token goes to the expert
        if hit.is_meta or not bool(hit.any()):  # as if a placeholder had routed no token
            return x
        return self.expert(x) * scale


def test_a_pass_that_ends_without_its_inputs_after_a_placeholder_runs_again():
    block, calib = _Routed(), _calib()
    taken: list[str] = []
    with calib.reusing_linear_outputs(block):
        seen = feed_inputs(block, {"router": block.router, "expert": block.expert}, calib,
                           lambda name, x: taken.append(name))
    assert seen == {"router": 3, "expert": 3} and taken == ["router", "expert"] * 3


def test_the_pipeline_gives_the_memo_a_quarter_of_the_available_memory(monkeypatch):
    from qdlm_export.methods.capture import MEMO_BUDGET_BYTES
    from qdlm_export.quantize import pipeline

    block = _Chain()
    for available, budget in [(4 << 30, 1 << 30), (100 << 30, 8 << 30), (10 << 20, (10 << 20) // 4),
                              (None, MEMO_BUDGET_BYTES)]:
        monkeypatch.setattr(pipeline, "available_memory", lambda device, available=available: available)
        assert pipeline.memo_budget(block) == budget


class _Attention(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.q, self.k, self.o = (nn.Linear(width, width) for _ in range(3))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        return self.o(torch.softmax(scores, dim=-1) @ x)


class _Layer(nn.Module):
    """A decoder layer in miniature: an attention and a gated MLP, each a submodule holding linears."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.attn, self.mlp = _Attention(width), _GateUp(width)

    def forward(self, x, scale=1.0):
        h = x + self.attn(x)
        return (h + self.mlp(h)) * scale


def _layer_reference(layer: _Layer, calib: BlockCalibration) -> list[torch.Tensor]:
    """float64, from the weights alone."""
    W = {k: v.double() for k, v in layer.state_dict().items()}
    lin = lambda x, name: x @ W[f"{name}.weight"].T + W[f"{name}.bias"]  # noqa: E731
    outs = []
    for h, (scale,) in zip(calib.hidden, calib.call_args):
        x = h.double()
        probs = torch.softmax(lin(x, "attn.q") @ lin(x, "attn.k").transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        h1 = x + lin(probs @ x, "attn.o")
        outs.append((h1 + lin(torch.tanh(lin(h1, "mlp.gate")) * lin(h1, "mlp.up"), "mlp.down")) * scale)
    return outs


def test_a_submodule_whose_linears_are_unchanged_is_answered_whole_unless_a_capture_waits_inside():
    layer, calib = _Layer(), _calib()
    with calib.reusing_linear_outputs(layer) as memo:
        calib.run(layer)
        assert layer.attn.calls == 3
        _requantize(layer.mlp.down)
        calib.linears_changed([layer.mlp.down])
        outputs = calib.run(layer)
        assert layer.attn.calls == 3  # attention, softmax and all, answered from the memo
        assert memo.computed == 3 * 6 + 3  # only the down projection ran again
        for got, want in zip(outputs, _layer_reference(layer, calib)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        taken: list[torch.Tensor] = []
        seen = feed_inputs(layer, {"attn.o": layer.attn.o}, calib, lambda name, x: taken.append(x))
        assert seen == {"attn.o": 3} and layer.attn.calls == 6  # the capture's hook inside made it run
        for x, h in zip(taken, calib.hidden):
            probs = torch.softmax(layer.attn.q(h) @ layer.attn.k(h).transpose(-1, -2) / 4.0, dim=-1)
            torch.testing.assert_close(x, probs @ h)
        _requantize(layer.attn.q)
        calib.linears_changed([layer.attn.q])
        outputs = calib.run(layer)
        assert layer.attn.calls == 9  # q changed: every batch runs the attention again
    for got, want in zip(outputs, _layer_reference(layer, calib)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
