"""DiffusionGemma's denoising-path calibration (quantize/denoising_calibration.py, quantize/paired_walk.py).

References: the model ``from_pretrained`` loads, run through its own forward
(``input_ids=context, decoder_input_ids=canvas, self_conditioning_logits=...``: transformers' encoder,
cache and decoder), float64 recomputations, and counting statistics of the noising draws.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from qdlm_export.errors import ConfigError, UnsupportedModelError
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma
from qdlm_export.methods.capture import feed_inputs
from qdlm_export.quantize.denoising_calibration import (
    denoising_error,
    denoising_windows,
    noise_windows,
    soft_embeddings,
    split_canvas_length,
)
from qdlm_export.quantize.paired_walk import (
    PairedLayer,
    capture_denoising_inputs,
    packed_attention_masks,
    paired_layer,
    unpack,
)
from tests.kernel_inputs import fresh_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CANVAS, WINDOW = 8, 16  # the fixture's canvas_length and sliding_window


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "model", seed=4, canvas_length=CANVAS,
                                      sliding_window=WINDOW)


def _load(folder, dtype=torch.float32, attn="sdpa"):
    # eager experts: the grouped-GEMM default has no float64 kernel
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation=attn,
                                                        experts_implementation="eager").eval()
    # The fixture stores equal layer_scalars in both stacks; make them differ (in memory) so that using
    # the wrong stack's is visible.
    gen = fresh_generator()
    with torch.no_grad():
        for layer in model.model.encoder.language_model.layers:
            layer.layer_scalar.mul_(1.1 + torch.rand(1, generator=gen, dtype=dtype))
    return model


def _seed(gen) -> int:
    """A noising seed drawn from the test's generator (so QDLM_TEST_SEED replays it)."""
    return int(torch.randint(0, 2**31 - 1, (), generator=gen))


def _walk(model, calib):
    for index in range(len(model.model.decoder.layers)):
        calib.hidden = calib.run(paired_layer(model, index))
    return torch.cat(calib.hidden)


def _logits(model, canvas_hidden):
    cap = model.config.text_config.final_logit_softcapping
    return torch.tanh(model.lm_head(model.model.decoder.norm(canvas_hidden)).float() / cap) * cap


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# ---- the split and the noise ----------------------------------------------------------------------


@pytest.mark.parametrize("seqlen, canvas, want", [(2048, 256, 256), (512, 256, 256), (300, 256, 150),
                                                  (41, 8, 8), (13, 8, 6), (2, 256, 1)])
def test_canvas_is_capped_so_the_context_keeps_half_the_window(seqlen, canvas, want):
    assert split_canvas_length(seqlen, canvas) == want
    assert seqlen - want >= seqlen / 2


def test_windows_too_short_or_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="at least one context token"):
        split_canvas_length(1, 256)
    with pytest.raises(ConfigError, match="mode"):
        noise_windows(torch.zeros(2, 8, dtype=torch.long), canvas_length=4, vocab_size=10, seed=0, mode="masked")
    with pytest.raises(ConfigError, match="canvas_length"):
        denoising_windows(torch.zeros(2, 8, dtype=torch.long), {"canvas_length": "x", "text_config": {"vocab_size": 9}},
                          seed=0)


@pytest.mark.parametrize("vocab", [50, 2112])
def test_noise_matches_the_drawn_levels_and_replaced_ids_are_uniform(vocab):
    gen = fresh_generator()
    n, seqlen = 3000, 24
    clean_ids = torch.randint(0, 40, (n, seqlen), generator=gen)  # far from uniform: nothing to inherit
    windows = noise_windows(clean_ids, canvas_length=CANVAS, vocab_size=vocab, seed=_seed(gen),
                            first_step_fraction=0.25)
    k = CANVAS
    assert windows.context_length == seqlen - k and windows.canvas_length == k
    assert torch.equal(windows.context, clean_ids[:, :-k]) and torch.equal(windows.clean, clean_ids[:, -k:])
    first = ~windows.self_conditioned
    # first steps: level 1, every position replaced; later steps: round(t K) positions, the rest clean
    assert torch.all(windows.noise_level[first] == 1) and torch.all(windows.noised[first])
    later = windows.noise_level[~first]
    assert torch.all((later >= 0) & (later < 1))
    counts = windows.noised.sum(1)
    assert torch.equal(counts[~first], torch.round(later * k).long())
    assert torch.equal(windows.canvas[~windows.noised], windows.clean[~windows.noised])
    # how many first steps, and the later levels' spread: binomial and U(0, 1) bounds (5 sigma)
    assert abs(first.sum().item() - 0.25 * n) < 5 * math.sqrt(n * 0.25 * 0.75)
    assert abs(later.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / later.numel())
    assert abs((later < 0.25).double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / later.numel())
    # replaced ids: uniform over the whole vocabulary (chi-square against uniform, coarse and per-id
    # bins; with 50 ids every id has ~280 draws, so a range short by one id fails)
    replaced = windows.canvas[windows.noised]
    assert replaced.min() >= 0 and replaced.max() < vocab
    for bins in (10, vocab):
        observed = torch.bincount(replaced * bins // vocab, minlength=bins).double()
        expected = replaced.numel() / bins
        chi2 = ((observed - expected) ** 2 / expected).sum().item()
        assert chi2 < (bins - 1) + 5 * math.sqrt(2 * (bins - 1)), (bins, chi2)
    # ...and independent of the clean token (which falls back only by chance, 1/vocab)
    assert (replaced == windows.clean[windows.noised]).double().mean().item() < 5 / vocab + 1e-3


def test_self_conditioning_stand_in():
    gen = fresh_generator()
    vocab, seed = 97, _seed(gen)
    windows = noise_windows(torch.randint(0, vocab, (200, 20), generator=gen), canvas_length=6, vocab_size=vocab,
                            seed=seed, first_step_fraction=0.3)
    sc, c = windows.self_conditioned, windows.confidence
    assert torch.all(c[~sc] == 0) and torch.all((c[sc] >= 0) & (c[sc] < 1))
    # the kept (accepted) positions are predicted at least as confidently as the re-noised ones
    for row in torch.nonzero(sc).flatten().tolist():
        kept, noised = c[row][~windows.noised[row]], c[row][windows.noised[row]]
        if kept.numel() and noised.numel():
            assert kept.min() >= noised.max()
    # the logits' softmax is c on the clean token and (1 - c) / (V - 1) on every other one
    probs = windows.self_conditioning_logits(dtype=torch.float64).softmax(-1)[sc]
    clean = windows.clean[sc]
    on_clean = probs.gather(-1, clean[..., None])[..., 0]
    torch.testing.assert_close(on_clean, c[sc].double(), rtol=1e-6, atol=1e-7)
    others = (1 - c[sc].double()) / (vocab - 1)
    off_clean = torch.ones_like(probs, dtype=torch.bool).scatter(-1, clean[..., None], False)
    torch.testing.assert_close(probs[off_clean].view(*clean.shape, vocab - 1),
                               others[..., None].expand(*clean.shape, vocab - 1), rtol=1e-6, atol=1e-9)
    # same seed, same windows; another seed, other windows
    tokens = torch.cat([windows.context, windows.clean], 1)
    again = noise_windows(tokens, canvas_length=6, vocab_size=vocab, seed=seed, first_step_fraction=0.3)
    assert torch.equal(again.canvas, windows.canvas) and torch.equal(again.confidence, windows.confidence)
    other = noise_windows(tokens, canvas_length=6, vocab_size=vocab, seed=seed + 1, first_step_fraction=0.3)
    assert not torch.equal(other.canvas, windows.canvas)


def test_soft_embeddings_equal_the_softmax_of_the_logits_times_the_embeddings(folder):
    model = _load(folder, torch.float64)
    embed = model.model.decoder.embed_tokens
    vocab = embed.weight.shape[0]
    gen = fresh_generator()
    windows = noise_windows(torch.randint(0, vocab, (6, 20), generator=gen), canvas_length=CANVAS, vocab_size=vocab,
                            seed=_seed(gen), first_step_fraction=0.3)
    want = windows.self_conditioning_logits(dtype=torch.float64).softmax(-1) @ embed.weight * embed.embed_scale
    want = want * windows.self_conditioned[:, None, None]
    torch.testing.assert_close(soft_embeddings(windows, embed), want, rtol=1e-10, atol=1e-10)


# ---- the paired walk reproduces the model -------------------------------------------------------------


@pytest.mark.parametrize("attn, seqlen", [("sdpa", 44), ("eager", 44), ("sdpa", 13)])
def test_paired_chain_reproduces_the_models_denoising_forward(folder, attn, seqlen):
    """44 tokens: 36 of context, more than the sliding window, so sliding layers' caches are cut;
    13: a context shorter than the window and a canvas capped at 6."""
    model = _load(folder, attn=attn)
    gen = fresh_generator()
    vocab = model.config.text_config.vocab_size
    tokens = torch.randint(0, vocab, (5, seqlen), generator=gen)
    for _ in range(50):  # fresh draws until both kinds of window are present (each draw: 9 % has one kind only)
        windows = denoising_windows(tokens, model.config, seed=_seed(gen), first_step_fraction=0.4)
        if windows.self_conditioned.any() and not windows.self_conditioned.all():
            break
    else:
        pytest.fail("50 draws of 5 windows never mixed first-step and self-conditioned windows")
    packed = _walk(model, capture_denoising_inputs(model, windows, batch_size=2))
    context, canvas = unpack(packed, windows.context_length)
    with torch.no_grad():
        out = model(**windows.model_inputs())
    assert _rel(_logits(model, canvas), out.logits) < 2e-5
    assert _rel(model.model.encoder.language_model.norm(context), out.encoder_last_hidden_state) < 2e-6


@pytest.mark.parametrize("first_step_fraction, tolerance", [(1.0, 1e-13), (0.0, 2e-6)])
def test_paired_chain_in_float64(folder, first_step_fraction, tolerance):
    """Without self-conditioning the walk is the model's computation to float64 rounding; with it, the
    model's own softmax runs in float32, which bounds the agreement."""
    model = _load(folder, torch.float64)
    gen = fresh_generator()
    windows = denoising_windows(torch.randint(0, 2000, (3, 40), generator=gen), model.config,
                                seed=_seed(gen), first_step_fraction=first_step_fraction)
    context, canvas = unpack(_walk(model, capture_denoising_inputs(model, windows, batch_size=3)),
                             windows.context_length)
    with torch.no_grad():
        out = model.model(**windows.model_inputs())
    assert _rel(model.model.decoder.norm(canvas), out.last_hidden_state) < tolerance
    assert _rel(model.model.encoder.language_model.norm(context), out.encoder_last_hidden_state) < 1e-13


def test_encoder_only_mode_is_the_encoder_on_whole_windows(folder):
    model = _load(folder)
    gen = fresh_generator()
    tokens = torch.randint(0, 2000, (4, 37), generator=gen)
    windows = denoising_windows(tokens, model.config, seed=0, mode="encoder")
    assert windows.canvas_length == 0 and torch.equal(windows.context, tokens)
    packed = _walk(model, capture_denoising_inputs(model, windows, batch_size=3))
    with torch.no_grad():
        want = model.model.encoder(input_ids=tokens).last_hidden_state
    assert _rel(model.model.encoder.language_model.norm(packed), want) < 2e-6


def test_block_zero_inputs_need_no_layer(folder):
    """The capture uses the embeddings, the self-conditioning MLP and the rotary tables only: with every
    layer of both stacks on ``meta`` it gives what it gives on the loaded model."""
    model = _load(folder)
    gen = fresh_generator()
    windows = denoising_windows(torch.randint(0, 2000, (3, 30), generator=gen), model.config,
                                seed=_seed(gen), first_step_fraction=0.5)
    want = capture_denoising_inputs(model, windows, batch_size=2)
    model.model.decoder.layers.to("meta")
    model.model.encoder.language_model.layers.to("meta")
    got = capture_denoising_inputs(model, windows, batch_size=2)
    for a, b in zip(got.hidden, want.hidden, strict=True):
        assert torch.equal(a, b)
    assert got.call_kwargs[0]["context_length"] == windows.context_length


# ---- the layer as the methods see it --------------------------------------------------------------------


def test_paired_layer_is_the_decoder_layer_to_the_methods(folder):
    model = _load(folder)
    decoder, encoder = model.model.decoder.layers[0], model.model.encoder.language_model.layers[0]
    calls = []
    paired = PairedLayer(encoder, decoder, share=lambda block, shared: calls.append((block, shared)))
    assert [n for n, _ in paired.named_modules()][1:] == [n for n, _ in decoder.named_modules()][1:]
    assert [(n, p) for n, p in paired.named_parameters()] == [(n, p) for n, p in decoder.named_parameters()]
    assert paired.get_submodule("self_attn.q_proj") is decoder.self_attn.q_proj
    replacement = copy.deepcopy(decoder.mlp.down_proj)
    paired.get_submodule("mlp").down_proj = replacement
    assert decoder.mlp.down_proj is replacement
    new_norm = copy.deepcopy(decoder.input_layernorm)
    paired.input_layernorm = new_norm
    assert decoder.input_layernorm is new_norm and "input_layernorm" not in paired.__dict__

    # one call per module and batch, with every packed token: hooks that stop at the first call see
    # the canvas too (the two stacks' modules are the same objects)
    gen = fresh_generator()
    windows = denoising_windows(torch.randint(0, 2000, (4, 30), generator=gen), model.config, seed=3)
    calib = capture_denoising_inputs(model, windows, batch_size=2)
    calls.clear()
    seen = []
    names = ("self_attn.q_proj", "mlp.down_proj", "pre_feedforward_layernorm_2")
    counts = feed_inputs(paired, {n: paired.get_submodule(n) for n in names}, calib,
                         lambda name, x: seen.append((name, x.shape[:-1].numel())))
    assert counts == {n: len(calib) for n in names}
    assert all(rows == 2 * 30 for _, rows in seen)
    # the q_proj input is the input norm of the packed hidden states: context and canvas rows
    captured = []
    feed_inputs(paired, {"q": paired.self_attn.q_proj}, calib, lambda _, x: captured.append(x))
    for x, h in zip(captured, calib.hidden, strict=True):
        torch.testing.assert_close(x, decoder.input_layernorm(h))
    assert calls and all(c == (decoder, encoder) for c in calls)
    scalar = decoder.layer_scalar
    calib.run(paired)
    assert decoder.layer_scalar is scalar and decoder.layer_scalar.shape == (1,)


def test_packed_masks():
    """Element by element: context rows causal (and within the window for sliding layers); canvas rows
    every canvas position and the cached context (all; or the last window - 1 positions)."""
    context, canvas, window = 9, 4, 5
    masks = packed_attention_masks(context, canvas, window, ["sliding_attention", "full_attention"])
    for kind, mask in masks.items():
        assert mask.shape == (1, 1, context + canvas, context + canvas)
        for i in range(context + canvas):
            for j in range(context + canvas):
                if i < context:
                    want = j <= i and (kind == "full_attention" or i - j < window)
                else:
                    want = j >= context or kind == "full_attention" or j >= context - (window - 1)
                assert bool(mask[0, 0, i, j]) == want, (kind, i, j)


def test_unsupported_configs_are_refused(folder):
    model = _load(folder)
    windows = denoising_windows(torch.randint(0, 2000, (1, 20)), model.config, seed=0)
    model.config.text_config.use_bidirectional_attention = "all"
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        capture_denoising_inputs(model, windows, batch_size=1)
    model.config.text_config.use_bidirectional_attention = "vision"
    calib = capture_denoising_inputs(model, windows, batch_size=1)
    model.model.decoder.layers[0].self_attn.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="flex_attention"):
        calib.run(paired_layer(model, 0))


# ---- held-out denoising error ---------------------------------------------------------------------------


def test_denoising_error(folder):
    original = _load(folder)
    gen = fresh_generator()
    vocab = original.config.text_config.vocab_size
    windows = denoising_windows(torch.randint(0, vocab, (4, 30), generator=gen), original.config,
                                seed=_seed(gen), first_step_fraction=0.5)
    assert denoising_error(original, original, windows, batch_size=3) == 0.0
    # a copy computes the same up to float32 rounding (its tensors sit elsewhere in memory)
    assert denoising_error(copy.deepcopy(original), original, windows, batch_size=3) < 1e-5
    changed = copy.deepcopy(original)
    with torch.no_grad():
        weight = changed.model.decoder.layers[1].mlp.up_proj.weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=gen))
    got = denoising_error(changed, original, windows, batch_size=3)
    # reference: one window at a time, the self-conditioning logits built here as log-probabilities
    num = den = 0.0
    context, canvas = windows.context, windows.canvas
    for row in range(len(windows)):
        inputs = {"input_ids": context[row:row + 1], "decoder_input_ids": canvas[row:row + 1]}
        if windows.self_conditioned[row]:
            c = windows.confidence[row].double()[:, None]
            probs = ((1 - c) / (vocab - 1)).expand(-1, vocab).clone()
            probs.scatter_(1, windows.clean[row][:, None], c)
            inputs["self_conditioning_logits"] = probs.log().float()[None]
        with torch.no_grad():
            a = changed(**inputs).logits.double()
            b = original(**inputs).logits.double()
        num += (a - b).pow(2).sum().item()
        den += b.pow(2).sum().item()
    assert got > 1e-3
    assert got == pytest.approx(math.sqrt(num / den), rel=1e-4)
