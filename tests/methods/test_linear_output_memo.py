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
        # Per batch (3 of them): each of the 7 linears once with its quantized weight, plus q, k and
        # ff_proj once with their float weights (a stage's pass stops only when its last linear, v or
        # up_proj, is reached). The last block's ff_out never runs: nothing reads that block's outputs.
        assert len(memos[0].linears) == 7
        assert memos[0].computed == 3 * (7 + 3) and memos[1].computed == 3 * (6 + 3)
