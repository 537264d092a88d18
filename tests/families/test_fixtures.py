"""The tiny LLaDA/Dream fixtures, the shipped tokenizer and corpus, and the embedded default checkpoint.

The key test is ``test_matches_float64_reference``: an independent forward pass written here with
plain torch ops (RMSNorm, rotate-half RoPE, explicit-softmax attention, SwiGLU) over the raw
safetensors reproduces the logits of the remote code loaded through transformers, which shows the
fixtures compute what LLaDA and Dream compute.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from qdlm_export.fixtures import (
    FAMILIES,
    MASK_ID,
    PAD_ID,
    build_tiny_model,
    tokenizer_dir,
)

ASSETS = tokenizer_dir().parent
EMBEDDED = ASSETS / "tiny-llada"  # the embedded default of `qdlm-export quantize`
SHIPPED = {"llada": EMBEDDED, "dream": ASSETS / "tiny-dream"}  # trained by examples/train_tiny_dllm.py
REMOTE_CODE = {"llada": ("configuration_llada.py", "modeling_llada.py"),
               "dream": ("configuration_dream.py", "modeling_dream.py")}
VOCAB = 2048
SIZES = {"hidden_size": 64, "intermediate_size": 96, "num_layers": 2, "num_heads": 4}  # head_dim 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (folder, fp32 model); Dream gets its default GQA (2 kv heads for 4 heads)."""
    out = {}
    for family in FAMILIES:
        folder = build_tiny_model(family, tmp_path_factory.mktemp(family) / "m", seed=0, **SIZES)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        out[family] = (folder, model)
    return out


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _expected_keys(family, layers=2):
    if family == "llada":
        per_block = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
        keys = {f"model.transformer.blocks.{i}.{m}.weight" for i in range(layers) for m in per_block}
        return keys | {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    per_layer += [f"self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")]
    keys = {f"model.layers.{i}.{k}" for i in range(layers) for k in per_layer}
    return keys | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


# --- loading, names, sizes -----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_names_are_the_public_ones(built, family):
    folder, model = built[family]
    assert set(model.state_dict()) == _expected_keys(family)
    assert set(load_file(folder / "model.safetensors")) == _expected_keys(family)


def test_llada_module_tree(built):
    _, model = built["llada"]
    assert type(model).__name__ == "LLaDAModelLM" and type(model.model).__name__ == "LLaDAModel"
    t = model.model.transformer
    assert isinstance(t, nn.ModuleDict) and set(t.keys()) == {"wte", "ln_f", "blocks", "ff_out"}
    assert isinstance(t.wte, nn.Embedding) and isinstance(t.ff_out, nn.Linear)
    block = t.blocks[0]
    assert type(block).__name__ == "LLaDALlamaBlock"
    for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
        assert type(getattr(block, name)) is nn.Linear and getattr(block, name).bias is None
    assert hasattr(block, "rotary_emb") and hasattr(block, "attn_norm") and hasattr(block, "ff_norm")


def test_dream_module_tree(built):
    _, model = built["dream"]
    assert type(model).__name__ == "DreamModel"
    layer = model.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert type(getattr(layer.self_attn, name)) is nn.Linear and getattr(layer.self_attn, name).bias is not None
    assert layer.self_attn.o_proj.bias is None
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert type(getattr(layer.mlp, name)) is nn.Linear
    assert hasattr(model.model, "rotary_emb") and hasattr(model.model, "norm")


@pytest.mark.parametrize("family", FAMILIES)
def test_config_sizes_are_honoured(built, family):
    folder, model = built[family]
    config = json.loads((folder / "config.json").read_text())
    sd = model.state_dict()
    if family == "llada":
        assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
        assert (config["d_model"], config["n_layers"], config["n_heads"], config["n_kv_heads"]) == (64, 2, 4, 4)
        assert config["mlp_hidden_size"] == 96 and config["vocab_size"] == config["embedding_size"] == VOCAB
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llada.LLaDAModelLM"
        q, k = sd["model.transformer.blocks.0.q_proj.weight"], sd["model.transformer.blocks.0.k_proj.weight"]
        up = sd["model.transformer.blocks.0.up_proj.weight"]
    else:
        assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
        assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
        assert config["intermediate_size"] == 96 and config["vocab_size"] == VOCAB
        q, k = sd["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.k_proj.weight"]
        up = sd["model.layers.0.mlp.up_proj.weight"]
        assert sd["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0  # random, not zero
    assert config["mask_token_id"] == MASK_ID and config["pad_token_id"] == PAD_ID
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert q.shape == (64, 64) and k.shape == ((64 if family == "llada" else 32), 64) and up.shape == (96, 64)
    assert model.config.mask_token_id == MASK_ID


def test_llada_loads_as_causal_lm_auto_class(built):
    folder, model = built["llada"]
    lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    ids = _ids()
    torch.testing.assert_close(lm(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_build_and_load(tmp_path, family):
    folder = build_tiny_model(family, tmp_path / family, seed=1, dtype=torch.bfloat16, **SIZES)
    assert all(t.dtype == torch.bfloat16 for t in load_file(folder / "model.safetensors").values())
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
    logits = model(_ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_gqa_for_llada_and_mha_for_dream(tmp_path):
    for family, kv in (("llada", 2), ("dream", 4)):
        folder = build_tiny_model(family, tmp_path / family, num_kv_heads=kv, **SIZES)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        _check_reference(folder, model, family)


# --- behaviour -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_attention_is_bidirectional(built, family):
    _, model = built[family]
    ids = _ids(batch=1, seq=10)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 7) % VOCAB
    a, b = model(ids).logits, model(changed).logits
    # A causal model would leave every earlier position untouched.
    assert (a[0, :-1] - b[0, :-1]).abs().amax() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_right_padding_leaves_real_positions_unchanged(built, family):
    _, model = built[family]
    ids = _ids(batch=1, seq=9)
    padded = torch.cat([ids, torch.full((1, 4), PAD_ID)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    ref = model(ids).logits
    out = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(out[:, :9], ref, rtol=0, atol=1e-5)
    # And the mask matters: without it the pads are attended to.
    assert (model(padded).logits[:, :9] - ref).abs().amax() > 1e-4


@torch.no_grad()
def test_dream_left_padding_with_position_ids(built):
    """Dream's sampler left-pads and passes positions counted from the first real token."""
    _, model = built["dream"]
    ids = _ids(batch=1, seq=9)
    padded = torch.cat([torch.full((1, 3), PAD_ID), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(out[:, 3:], model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_hidden_states_and_tuple_output(built, family):
    _, model = built[family]
    ids = _ids()
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # input of each block + final normed state
    assert model(ids, return_dict=False)[0].shape == (2, 12, VOCAB)


# --- an independent float64 reference ------------------------------------------------------------

def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta, positions):
    """Rotate-half RoPE on (T, hd): pairs (i, i + hd/2) turn by position * theta^(-2i/hd)."""
    hd = x.shape[-1]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[:, : hd // 2], x[:, hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(x, w, n_heads, n_kv, theta, keep, positions):
    hd = w["q"].shape[0] // n_heads
    q, k, v = (x @ w[n].T + w.get(n + "_b", 0) for n in "qkv")
    heads = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv)  # the kv head this query head reads
        qh = _rope(q[:, h * hd:(h + 1) * hd], theta, positions)
        kh = _rope(k[:, g * hd:(g + 1) * hd], theta, positions)
        scores = qh @ kh.T / math.sqrt(hd)
        scores = scores.masked_fill(~keep[None, :], -math.inf)  # padding hides keys; nothing causal
        p = torch.exp(scores - scores.max(-1, keepdim=True).values)
        heads.append((p / p.sum(-1, keepdim=True)) @ v[:, g * hd:(g + 1) * hd])
    return torch.cat(heads, -1) @ w["o"].T


def _swiglu(x, w):
    gate = x @ w["gate"].T
    return (gate * torch.sigmoid(gate) * (x @ w["up"].T)) @ w["down"].T


def _reference_logits(folder, family, ids, keep, positions):
    config = json.loads((folder / "config.json").read_text())
    sd = {k: t.to(torch.float64) for k, t in load_file(folder / "model.safetensors").items()}
    if family == "llada":
        n_layers, nh, nkv, eps, theta = (config[k] for k in ("n_layers", "n_heads", "n_kv_heads", "rms_norm_eps", "rope_theta"))
        emb, final, head = sd["model.transformer.wte.weight"], sd["model.transformer.ln_f.weight"], sd["model.transformer.ff_out.weight"]

        def layer(i):
            p = f"model.transformer.blocks.{i}."
            return (sd[p + "attn_norm.weight"], sd[p + "ff_norm.weight"],
                    {"q": sd[p + "q_proj.weight"], "k": sd[p + "k_proj.weight"], "v": sd[p + "v_proj.weight"], "o": sd[p + "attn_out.weight"]},
                    {"gate": sd[p + "ff_proj.weight"], "up": sd[p + "up_proj.weight"], "down": sd[p + "ff_out.weight"]})
    else:
        n_layers, nh, nkv, eps, theta = (config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta"))
        emb, final, head = sd["model.embed_tokens.weight"], sd["model.norm.weight"], sd["lm_head.weight"]

        def layer(i):
            p = f"model.layers.{i}."
            attn = {n: sd[f"{p}self_attn.{n}_proj.weight"] for n in "qkvo"}
            attn.update({n + "_b": sd[f"{p}self_attn.{n}_proj.bias"] for n in "qkv"})
            return (sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"], attn,
                    {n: sd[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up", "down")})
    out = []
    for b in range(ids.shape[0]):
        x = emb[ids[b]]
        for i in range(n_layers):
            norm1, norm2, attn, mlp = layer(i)
            x = x + _attention(_rms(x, norm1, eps), attn, nh, nkv, theta, keep[b], positions[b])
            x = x + _swiglu(_rms(x, norm2, eps), mlp)
        out.append(_rms(x, final, eps) @ head.T)
    return torch.stack(out)


@torch.no_grad()
def _check_reference(folder, model, family, mask=None):
    ids = _ids(batch=2, seq=16, seed=3)
    keep = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    positions = torch.arange(ids.shape[1]).expand(ids.shape)
    ref = _reference_logits(folder, family, ids, keep, positions)
    got = model(ids, attention_mask=mask).logits.to(torch.float64)
    rows = keep  # padded rows differ by design (the real models leave them undefined)
    rel = (got[rows] - ref[rows]).norm() / ref[rows].norm()
    assert rel <= 1e-4, f"{family}: relative error {rel:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_float64_reference(built, family):
    folder, model = built[family]
    _check_reference(folder, model, family)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    _check_reference(folder, model, family, mask=mask)


# --- builder options -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, family):
    a = build_tiny_model(family, tmp_path / "a", seed=5, **SIZES)
    b = build_tiny_model(family, tmp_path / "b", seed=5, **SIZES)
    c = build_tiny_model(family, tmp_path / "c", seed=6, **SIZES)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert all(not torch.equal(wa[k], wc[k]) for k in wa)


def test_norm_gains_are_jittered_around_one(built):
    sd = load_file(built["llada"][0] / "model.safetensors")
    gain = sd["model.transformer.blocks.0.attn_norm.weight"]
    assert 0.9 <= gain.min() < gain.max() <= 1.1 and gain.std() > 0.02


@torch.no_grad()
def test_outlier_channels(tmp_path):
    folder = build_tiny_model("llada", tmp_path / "o", outlier_channels=3, outlier_scale=50.0, **SIZES)
    channels = json.loads((folder / "fixture.json").read_text())["outlier_channels"]
    assert len(channels) == 3
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    block = model.model.transformer.blocks[0]
    seen = {}
    block.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    model(_ids())
    per_channel = seen["x"].abs().amax(dim=(0, 1))  # the q/k/v input, where SmoothQuant looks
    others = per_channel[[c for c in range(64) if c not in channels]]
    assert per_channel[channels].min() > 10 * others.median()


def test_builder_rejects_bad_sizes(tmp_path):
    from qdlm_export.errors import QdlmError

    with pytest.raises(QdlmError):
        build_tiny_model("gpt2", tmp_path / "x")
    with pytest.raises(QdlmError):
        build_tiny_model("dream", tmp_path / "x", num_heads=4, num_kv_heads=3)


# --- shipped assets ------------------------------------------------------------------------------

def test_tokenizer_round_trips_offline():
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    assert len(tok) == VOCAB
    assert (tok.eos_token, tok.mask_token, tok.pad_token) == ("<|endoftext|>", "<|mdm_mask|>", "<|pad|>")
    assert (tok.eos_token_id, tok.mask_token_id, tok.pad_token_id) == (0, MASK_ID, PAD_ID)
    text = "def f(x):\n    return {'naïve': x ** 2}  # ünïcödé, emoji 🙂, tabs\tand  spaces\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and MASK_ID not in ids


def test_default_corpus_is_shipped():
    text = (ASSETS / "corpus" / "default.txt").read_text(encoding="utf-8")
    assert 300_000 <= len(text.encode("utf-8")) <= 600_000
    assert "def " in text and "the " in text
    assert "Python Software Foundation" in (ASSETS / "corpus" / "SOURCE.md").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_trained_checkpoint(built, family):
    """tiny-llada (the embedded default) and tiny-dream: complete, small, current code, loadable."""
    folder = SHIPPED[family]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "training.json",
            "README.md", *REMOTE_CODE[family]} <= files
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 8 * 2**20
    # The builder writes the shipped model's code, so the tests of built models (the float64
    # reference above) check the code users get.
    for name in REMOTE_CODE[family]:
        assert (built[family][0] / name).read_bytes() == (folder / name).read_bytes()
    config = json.loads((folder / "config.json").read_text())
    sizes = json.loads((folder / "training.json").read_text())["sizes"]
    if family == "llada":
        got = (config["d_model"], config["n_heads"], config["n_kv_heads"], config["mlp_hidden_size"], config["n_layers"])
    else:
        got = (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
               config["intermediate_size"], config["num_hidden_layers"])
    assert got == tuple(sizes[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "num_layers"))
    assert got[0] % 128 == 0 and got[3] % 128 == 0  # group size 128 applies to every linear
    assert config["torch_dtype"] == "bfloat16" and config["vocab_size"] == VOCAB
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(folder)
    text = "Return the sum of the items."
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()


def test_embedded_default_is_the_trained_llada():
    from qdlm_export.cli.app import EMBEDDED_DEFAULT

    assert EMBEDDED_DEFAULT.resolve() == EMBEDDED.resolve()


def _without_version(path):
    data = json.loads(path.read_text())
    data.pop("transformers_version", None)
    return data


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_checkpoint_is_the_builders_layout_with_the_recorded_weights(tmp_path, family):
    """Everything but the weights is what build_tiny_model writes for the recorded sizes and seed;
    the weights have the builder's names, shapes and dtype, differ from its initialisation (they are
    trained) and hash to the sha256 that training.json records."""
    folder = SHIPPED[family]
    record = json.loads((folder / "training.json").read_text())
    sizes = {k: record["sizes"][k] for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")}
    built = build_tiny_model(family, tmp_path / "b", seed=record["seed"], dtype=torch.bfloat16, **sizes)
    for path in built.iterdir():
        if path.name == "model.safetensors":
            continue
        if path.suffix == ".json":
            assert _without_version(folder / path.name) == _without_version(path), path.name
        else:
            assert (folder / path.name).read_bytes() == path.read_bytes(), path.name
    init, shipped = load_file(built / "model.safetensors"), load_file(folder / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in shipped.items()} == {k: (v.shape, v.dtype) for k, v in init.items()}
    assert all(not torch.equal(init[k], shipped[k]) for k in init)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == record["model_safetensors_sha256"]
    assert record["family"] == family and record["heldout_nll"] < record["random_init_heldout_nll"]
