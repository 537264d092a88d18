"""The format's Hadamard matrices (``qdlm_export/hadamard.py``): the same matrices as before the
construction was unified (hashes recorded from the previous code), the Williamson table checked from
its defining identity, every hidden / MLP width of the supported families and common dense models
covered, clear refusals, and QuaRot / DuQuant W4A4 on a Llama with Llama-2-7B's MLP width 11008."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from qdlm_export.core import hadamard as Hd
from qdlm_export.errors import ConfigError
from qdlm_export.kernels.hadamard import hadamard_transform_torch
from tests.dense_models import save_causal_lm

# ---- the previous code's matrices --------------------------------------------------------------------
#
# Recorded from the code before this module existed (transforms._paley, which agreed exactly with the
# numpy kernels.hadamard.hadamard_k on every order both built): sha256 of H_m as row-major int8 bytes,
# first 16 hex digits, for every order m <= 300 it built ...
OLD_ORDERS = {
    12: "db7478025ce74776", 20: "d04b560308676ee7", 28: "a24c9c5912c711a9", 36: "1a7aed2f42a8c71d",
    44: "7608149d896734a0", 52: "0f34f05b9d09382d", 60: "91a505ae266d3871", 68: "90f5a68830fdaf41",
    76: "290dc2c593bbcba4", 84: "698e79250ff2545a", 100: "b27595a8d06a19e3", 108: "7deb180ca8331131",
    124: "afa026e6da7dbf96", 132: "1a068e9d8c241a50", 140: "902eb66771c67a6b", 148: "1a8964dfe75c61f5",
    164: "4f5d6f926990bd87", 180: "a86da22a8b87e572", 196: "1a89befa215d90f6", 204: "53e0e2c5ecf0e989",
    212: "65c4da76bec47226", 220: "f0261f6dad43abfd", 228: "53d30d0b137cb7de", 244: "ada841d2cc67df40",
    252: "38d86fa7cb27be6a", 276: "1042113b79dcbc32", 284: "29fb3b638e0e5ea1", 300: "76725178c616206f",
}
# ... sha256 over the concatenated full sha256 hex digests of the 55 orders 300 < m <= 1000 it built ...
OLD_300_1000 = "3ef1435e3089a77a4b3a221528ecf1a45ba7b37d6d8034aade2564857c051ec1"
# ... and of the whole unnormalised H(n) (int8), which also pins the factorisation and the Kronecker order.
OLD_FULL = {
    4: "14edb060b895542e36542bfe57c990c3ab60c74c6ded991c127ff28bf669f4aa",
    48: "aefde730a8e11f0f060cb80619112d7b2dbc9701d25d393746390da9865f0346",
    592: "9faee0dd2b2a775e56f7a4853e9bae0986ea43a4598c2415e7c4b595042eebc1",
    768: "5826fef0513e8d22a2778c26cb1d3b91ec884359b632d097405fffa8a00ee6ca",
    1536: "d09d838f4ea29a734f554076792989860cabbfaad7c950d3b24a266b0cb10338",
}


def _sha(h: torch.Tensor) -> str:
    return hashlib.sha256(bytes(h.to(torch.int8).flatten().view(torch.uint8).tolist())).hexdigest()  # no numpy


def test_every_order_built_before_is_the_same_matrix():
    assert {m: _sha(Hd.small_hadamard(m))[:16] for m in OLD_ORDERS} == OLD_ORDERS
    # No order <= 300 that was built before is missing, and the only new ones are the Williamson table's.
    new = {m for m in range(12, 301, 8) if Hd.has_hadamard(m)} - set(OLD_ORDERS)
    assert new == {92, 116, 156, 172}
    paley = [m for m in range(308, 1001, 8) if Hd.construction(m) in ("paley1", "paley2")]
    assert len(paley) == 55
    assert hashlib.sha256("".join(_sha(Hd.small_hadamard(m)) for m in paley).encode()).hexdigest() == OLD_300_1000


@pytest.mark.parametrize("n", sorted(OLD_FULL))
def test_full_matrices_are_the_same_as_before(n):
    assert _sha(Hd.hadamard_matrix(n, normalized=False)) == OLD_FULL[n]
    assert torch.equal(Hd.hadamard_matrix(n) * math.sqrt(n), Hd.hadamard_matrix(n, normalized=False).round())


# ---- the Williamson table -----------------------------------------------------------------------------


@pytest.mark.parametrize("w", sorted(Hd.WILLIAMSON_ROWS))
def test_williamson_table_entries(w):
    rows = [Hd.williamson_row(bits, w) for bits in Hd.WILLIAMSON_ROWS[w]]
    for bits, row in zip(Hd.WILLIAMSON_ROWS[w], rows):
        assert bits < 2**w and torch.equal(row[1:], row[1:].flip(0)), f"row {bits:x} of order {w} is not symmetric"
    mats = [Hd.circulant(r) for r in rows]
    assert torch.equal(sum(m @ m.T for m in mats), 4 * w * torch.eye(w, dtype=torch.int64))
    m = 4 * w
    h = Hd.small_hadamard(m)
    assert Hd.construction(m) == "williamson"
    assert h.dtype == torch.int64 and set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64))


def test_format_doc_lists_the_table():
    """docs/FORMAT.md defines the format: its table must be the code's, digit for digit."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md").read_text()
    for w, rows in Hd.WILLIAMSON_ROWS.items():
        line = f"| {4 * w} | {w} | " + " | ".join(f"`{r:x}`" for r in rows) + " |"
        assert line in doc, line


# ---- widths -------------------------------------------------------------------------------------------

# width -> the order m of its non-Sylvester factor (n = m * 2^k)
WIDTHS = {
    4096: 1, 12288: 12,  # LLaDA-8B (also Llama-2-7B / Mistral-7B / Llama-3-8B hidden; Qwen3-8B MLP)
    3584: 28, 18944: 148,  # Dream-7B, Qwen2-7B
    11008: 172,  # Llama-2-7B, Qwen2.5-3B MLP
    5120: 20, 13824: 108,  # Llama-2-13B, Qwen2.5-14B
    14336: 28,  # Mistral-7B, Llama-3-8B
    896: 28, 4864: 76, 1536: 12, 8960: 140, 2048: 1, 27648: 108,  # Qwen2.5 0.5B, 1.5B, 3B, 32B
    2304: 36, 9216: 36, 3072: 12, 24576: 12,  # Gemma-2-2B, Gemma-7B
    768: 12, 592: 148,  # the test fixtures
    8192: 1, 28672: 28, 29568: 924, 6912: 108, 9728: 76, 17408: 68, 25600: 100, 5504: 172, 22016: 172,
    4608: 36, 36864: 36, 2560: 20, 10240: 20, 17920: 140, 7168: 28, 20480: 20,  # other common dense models
    28: 28, 40: 20, 12: 12, 20: 20, 96: 12, 80: 20, 112: 28, 256: 1,  # head counts and head dims
}
DENSE_MAX = 2304  # H H^T computed densely up to here; above, on random integer vectors through the fast transform


@pytest.mark.parametrize("n", sorted(WIDTHS))
def test_width_is_covered(n):
    m, p = Hd.hadamard_factors(n)
    assert m == WIDTHS[n] and m * p == n and Hd.has_hadamard(n) and Hd.hadamard_unsupported_reason(n) is None
    if n <= DENSE_MAX:
        h = Hd.hadamard_matrix(n, normalized=False)
        assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))  # exact: integers in float64
        return
    # Integer inputs keep every float64 value exact: ||x H||^2 = n ||x||^2 and (x H) H^T = n x exactly.
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-8, 9, (6, n), generator=gen).double()
    y = hadamard_transform_torch(x, normalized=False)
    assert torch.equal(y, y.round())
    assert torch.equal((y * y).sum(-1), n * (x * x).sum(-1))
    assert torch.equal(hadamard_transform_torch(y, normalized=False, inverse=True), n * x)
    # The loader's transform (the definition, normalised) agrees.
    torch.testing.assert_close(Hd.hadamard_transform_reference(x), y / math.sqrt(n), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("n", [592, 768, 896, 1536, 2304, 172 * 4, 156 * 8, 92 * 4, 116 * 4])
def test_fast_transforms_equal_the_dense_matrix(n):
    gen = torch.Generator().manual_seed(n + 1)
    x = torch.randn(4, n, generator=gen, dtype=torch.float64)
    dense = x @ Hd.hadamard_matrix(n)
    torch.testing.assert_close(Hd.hadamard_transform_reference(x), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hadamard_transform_torch(x), dense, rtol=1e-12, atol=1e-12)


def test_williamson_width_against_an_independent_kronecker_product():
    """H(11008) = H_172 (x) S_64 / sqrt(n), with S_64 written here from its popcount formula."""
    n, p = 11008, 64
    i = torch.arange(p)
    v = i[:, None] & i[None, :]
    parity = torch.zeros_like(v)
    for b in range(6):
        parity ^= (v >> b) & 1
    S = (1 - 2 * parity).double()
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = torch.einsum("...ap,ab,pq->...bq", x.reshape(3, 172, p), Hd.small_hadamard(172).double(), S)
    torch.testing.assert_close(Hd.hadamard_transform_reference(x), expected.reshape(3, n) / math.sqrt(n),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "n,near",
    [
        (188 * 64, "11840, 11968, 12160, 12288"),  # 188 = 4 * 47: no construction here
        (14, "8, 12, 16, 20"),  # 2 * 7 (e.g. Qwen2.5-0.5B's 14 heads): no Hadamard matrix exists
        (71, "64, 68, 72, 76"),  # Falcon-7B's 71 heads
    ],
)
def test_impossible_widths_are_refused_clearly(n, near):
    reason = Hd.hadamard_unsupported_reason(n)
    assert reason is not None and str(n) in reason and reason.endswith(near)
    assert not Hd.has_hadamard(n)
    with pytest.raises(ValueError, match=str(n)):
        Hd.hadamard_matrix(n)


def test_quarot_refuses_an_impossible_width_with_a_config_error():
    from transformers import LlamaConfig

    from qdlm_export.families import family_for_config
    from qdlm_export.methods import method_class
    from qdlm_export.quantize.api import make_config

    config = LlamaConfig(hidden_size=64, intermediate_size=188 * 64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=256, tie_word_embeddings=False).to_dict()
    adapter = family_for_config(config)
    with pytest.raises(ConfigError, match="intermediate \\(MLP\\) size 12032.*188.*11968, 12160") as err:
        method_class("quarot")(make_config("quarot"), adapter, config)
    assert err.value.hint and "smoothquant or duquant" in err.value.hint


# ---- QuaRot and DuQuant W4A4 on a Llama with MLP width 11008 ------------------------------------------

CALIB = dict(nsamples=4, seqlen=32, seed=0)
METHODS = {
    "quarot": {"weight_method": "rtn", "w_clip": False},  # GPTQ on an 11008-wide Hessian is too slow here
    "duquant": {"max_rotation_steps": 4},
}


@pytest.fixture(scope="module")
def llama_11008(tmp_path_factory, one_torch_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False)
    return save_causal_lm(tmp_path_factory.mktemp("llama-11008") / "src", LlamaForCausalLM, config, seed=7)


@pytest.fixture(scope="module")
def written(llama_11008, tmp_path_factory):
    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.quantize.api import make_config, quantize

    root = tmp_path_factory.mktemp("w4a4-11008")
    out = {}
    for method, options in METHODS.items():
        out[method] = root / method
        quantize(str(llama_11008), out[method], make_config(method, **options),
                 calibration=CalibrationConfig(**CALIB), verify=False, device="cpu", batch_size=4)
    return out


@torch.no_grad()
def _in_memory(src: Path, method: str):
    """The pipeline's steps on the whole float model (tests/wa_helpers.py's in_memory, with the LM head)."""
    from transformers import AutoModelForCausalLM

    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.quantize.pipeline import capture_block_inputs
    from qdlm_export.quantize.api import make_config
    from tests import wa_helpers as H

    config = make_config(method, **METHODS[method])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qm = H.make_method(src, config)
    blocks = qm.adapter.block_list(model)
    qm.prepare(model)
    calib = capture_block_inputs(model, blocks, H.tokens(src, CalibrationConfig(**CALIB)), 4, torch.device("cpu"))
    for index, block in enumerate(blocks):
        qm.quantize_block(block, qm.adapter.block_prefix(index), calib)
        calib.hidden = calib.run(block)
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_w4a4_on_mlp_width_11008_reloads_and_computes_the_quantized_model(llama_11008, written, method):
    from transformers import AutoModelForCausalLM

    from qdlm_export.loader.hf_quantizer import QdlmLinear
    from tests.reference import dequantized_weights, load_tensors

    out = written[method]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    down = "model.layers.1.mlp.down_proj"
    if method == "quarot":
        assert qc["transforms"]["modules"][down][0] == {"op": "hadamard", "size": 11008, "stride": 1}
    assert (out / "qdlm_hadamard.py").is_file()  # the self-contained copy of the construction
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert isinstance(loaded.get_submodule(down), QdlmLinear)
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits.double()
        expected = _in_memory(llama_11008, method)(input_ids=ids).logits.double()
        float_logits = AutoModelForCausalLM.from_pretrained(llama_11008, dtype=torch.float32)(input_ids=ids).logits
    err = ((got - expected).norm() / expected.norm()).item()
    assert err <= 1e-5, f"{method}: loaded vs in-memory relative error {err:.2e}"
    assert ((got - float_logits.double()).norm() / float_logits.double().norm()).item() > 1e-3  # really quantized

    if method != "quarot":
        return
    # The down projection from the raw tensors in float64, as docs/FORMAT.md defines it: H(11008) (built
    # here as H_172 (x) S_64), 4-bit symmetric per-token input quantization, the dequantized weight.
    act = qc["activations"]
    assert act["bits"] == 4 and act["symmetric"] and act["granularity"] == "token"
    weight = dequantized_weights(out)[down]
    assert not any(k.startswith(down + ".input_") for k in load_tensors(out))  # no Hadamard tensor stored
    x = torch.randn(2, 5, 11008, generator=torch.Generator().manual_seed(4))
    h = torch.einsum("...ap,ab,pq->...bq", x.double().reshape(2, 5, 172, 64), Hd.small_hadamard(172).double(),
                     Hd.sylvester(64)).reshape(2, 5, 11008) / math.sqrt(11008)
    lo, hi = h.amin(-1, keepdim=True).clamp(max=0), h.amax(-1, keepdim=True).clamp(min=0)
    scale = torch.maximum(-lo, hi) * act["clip_ratio"] / 7
    q = h / scale
    hq = (torch.floor(q.abs() + 0.5) * torch.sign(q)).clamp(-7, 7) * scale
    with torch.no_grad():
        y = loaded.get_submodule(down)(x).double()
    expected_y = hq @ weight.T
    assert ((y - expected_y).norm() / expected_y.norm()).item() <= 1e-4


ISOLATED = """
import sys, torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
linear = model.get_submodule("model.layers.0.mlp.down_proj")
with torch.no_grad():
    logits = model(input_ids=torch.load(sys.argv[2])).logits
torch.save({"logits": logits, "class_module": type(linear).__module__}, sys.argv[3])
leaked = sorted(k for k in sys.modules if k.startswith("qdlm_export"))
assert not leaked, leaked
print("isolated-ok")
"""


def test_quarot_11008_self_contained_loads_without_qdlm_export(written, tmp_path):
    """The checkpoint's own copy of the construction (qdlm_hadamard.py) builds H_172 where qdlm-export
    cannot be imported, and the model computes what the installed package computes."""
    from transformers import AutoModelForCausalLM

    from tests.isolation import BLOCKER, run_isolated

    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    run_isolated(BLOCKER + ISOLATED, [str(written["quarot"]), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                 tmp_path)
    got = torch.load(tmp_path / "out.pt")
    assert got["class_module"].startswith("transformers_modules.") and got["class_module"].endswith(".qdlm_loader")
    native = AutoModelForCausalLM.from_pretrained(written["quarot"], trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(got["logits"], native(input_ids=ids).logits)
