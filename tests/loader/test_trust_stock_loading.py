"""Never random weights: our checkpoints in stock transformers, with qdlm-export not importable.

For every family (dense Qwen2, Llama and Mistral (LM head tied), which transformers builds natively; LLaDA and Dream, which
bring their own code), a default export and a ``--no-self-contained`` export are loaded in a fresh
interpreter where ``import qdlm_export`` fails (meta-path blocker, stdin closed so transformers'
"run custom code? [y/N]" prompt answers no):

* without ``trust_remote_code`` -> refused, the message saying to pass ``trust_remote_code=True``;
* default export with ``trust_remote_code=True`` -> loads through the folder's own copy of the loader,
  logits equal to the in-package load and to a float64 reference built from the format spec
  (tests/reference.py, no qdlm_export code);
* ``--no-self-contained`` with ``trust_remote_code=True`` -> refused with "pip install qdlm-export".

``AutoModel`` of a dense export builds the base model (no LM head, no ``model.`` level): it loads with
the package (no trust_remote_code) and, qdlm_export blocked, with ``trust_remote_code=True``, giving the
hidden states of the causal LM load's ``model.model(...)``.

No case may load silently: before this, a dense default export loaded as the dense model with random
linears (a warning about the unknown quant_method), and a LLaDA/Dream ``--no-self-contained`` export too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qdlm_export  # noqa: F401  (the in-package loader, for the reference logits)
from qdlm_export.exports.convert import convert
from qdlm_export.families import family_for_config
from qdlm_export.loader.native_wrappers import GUARD_MARKER, base_model_type, unwrap_config, wrap_config
from qdlm_export.loader.selfcontained import MARKER, is_self_contained, make_self_contained
from qdlm_export.quantize.api import make_config, quantize
from tests.dense_models import save_causal_lm
from tests.isolation import BLOCKER, rel, run_isolated
from tests.reference import dequantized_weights

TOKENS = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(7))
DENSE = {"qwen2", "llama", "mistral"}

STOCK = BLOCKER + """
import json, sys, torch
import transformers

jobs = json.loads(sys.argv[1])
tokens = torch.load(sys.argv[2])
results = {}
for job in jobs:
    auto = getattr(transformers, job["auto"])
    got = {}
    for trust in (False, True):
        try:
            model = auto.from_pretrained(job["folder"], trust_remote_code=trust, dtype=torch.float32)
        except Exception as exc:  # the refusal we want: recorded, asserted by the test
            got[str(trust)] = {"refused": type(exc).__name__, "message": str(exc)}
            continue
        with torch.no_grad():  # "last_hidden_state" for a base model (AutoModel of a dense causal LM)
            logits = getattr(model(input_ids=tokens), job.get("output", "logits"))
        out = job["out"] + f"-{trust}.pt"
        torch.save(logits, out)
        got[str(trust)] = {"loaded": type(model).__module__ + "." + type(model).__name__, "logits": out}
    results[job["name"]] = got
json.dump(results, open(sys.argv[3], "w"))
leaked = sorted(k for k in sys.modules if k.startswith("qdlm_export"))
assert not leaked, leaked
print("isolated-ok")
"""


@pytest.fixture(scope="module")
def dense_sources(tmp_path_factory, one_torch_thread):
    """Tiny Qwen2 and Llama causal LMs built by transformers itself, with the shipped tokenizer."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    root = tmp_path_factory.mktemp("dense")
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False)
    out = {}
    for name, config, cls, seed in (("qwen2", Qwen2Config(**shape), Qwen2ForCausalLM, 3),
                                    ("llama", LlamaConfig(attention_bias=True, **shape), LlamaForCausalLM, 4),
                                    # tied LM head: the tied weight is not in the checkpoint, and must not count as missing
                                    ("mistral", MistralConfig(**{**shape, "tie_word_embeddings": True}), MistralForCausalLM, 5)):
        out[name] = save_causal_lm(root / name, cls, config, seed=seed)
    return out


@pytest.fixture(scope="module")
def sources(dense_sources, tiny_llada, tiny_dream):
    return {**dense_sources, "llada": tiny_llada, "dream": tiny_dream}


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory):
    """(family, self_contained) -> native checkpoint written with the quantize defaults (W4 g64)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for family, source in sources.items():
        for sc in (True, False):
            folder = root / f"{family}-{'sc' if sc else 'nosc'}"
            quantize(str(source), folder, make_config("rtn", bits=4, group_size=64, symmetric=family != "llama"),
                     trust_remote_code=family not in DENSE, verify=False, self_contained=sc)
            out[family, sc] = folder
    return out


def auto_class(family: str) -> str:
    return "AutoModelForCausalLM" if family in DENSE else "AutoModel"


@pytest.fixture(scope="module")
def stock(exports, tmp_path_factory):
    """What stock transformers does with each export, qdlm_export blocked (one subprocess for all)."""
    work = tmp_path_factory.mktemp("stock")
    jobs = [{"name": f"{family}-{sc}", "folder": str(folder), "auto": auto_class(family),
             "out": str(work / f"{family}-{sc}")} for (family, sc), folder in exports.items()]
    jobs += [{"name": f"{family}-base", "folder": str(exports[family, True]), "auto": "AutoModel",
              "output": "last_hidden_state", "out": str(work / f"{family}-base")} for family in sorted(DENSE)]
    torch.save(TOKENS, work / "tokens.pt")
    run_isolated(STOCK, [json.dumps(jobs), str(work / "tokens.pt"), str(work / "results.json")], work)
    return json.loads((work / "results.json").read_text())


def in_package_logits(family: str, folder: Path) -> torch.Tensor:
    import transformers

    model = getattr(transformers, auto_class(family)).from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def reference_logits(family: str, source: Path, folder: Path) -> torch.Tensor:
    """The original model in float64 with each listed linear replaced by the format spec's dequantization."""
    import transformers

    model = getattr(transformers, auto_class(family)).from_pretrained(source, trust_remote_code=True, dtype=torch.float64)
    for name, weight in dequantized_weights(folder).items():
        model.get_submodule(name).weight.data = weight
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


FAMILIES = ["qwen2", "llama", "mistral", "llada", "dream"]


@pytest.mark.parametrize("sc", [True, False], ids=["default", "no-self-contained"])
@pytest.mark.parametrize("family", FAMILIES)
def test_without_trust_remote_code_stock_transformers_refuses(family, sc, stock):
    got = stock[f"{family}-{sc}"]["False"]
    assert got.get("refused") == "ValueError", got
    assert "custom code" in got["message"] and "trust_remote_code=True" in got["message"]


@pytest.mark.parametrize("family", FAMILIES)
def test_default_export_loads_correctly_in_stock_transformers(family, sources, exports, stock):
    got = stock[f"{family}-True"]["True"]
    assert "loaded" in got, got
    assert got["loaded"].startswith("transformers_modules.")  # the folder's own code, not qdlm_export
    logits = torch.load(got["logits"])
    folder = exports[family, True]
    assert torch.equal(logits, in_package_logits(family, folder))
    assert rel(logits, reference_logits(family, sources[family], folder)) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_no_self_contained_export_asks_for_qdlm_export(family, stock):
    got = stock[f"{family}-False"]["True"]
    assert got.get("refused") == "ImportError", got
    assert "pip install qdlm-export" in got["message"] and "random" in got["message"]


@pytest.mark.parametrize("family", sorted(DENSE))
def test_dense_layout(family, exports):
    """A dense family's native config names qdlm_<type>, with the wrapper files; the original is kept."""
    for sc in (True, False):
        folder = exports[family, sc]
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == f"qdlm_{family}" and base_model_type(config) == family
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_qdlm.")
        assert family_for_config(config).name == "dense-decoder"
        modeling = (folder / "modeling_qdlm.py").read_text()
        assert (MARKER in modeling) is sc and (GUARD_MARKER in modeling) is (not sc)
        assert is_self_contained(folder) is sc
        restored = unwrap_config(config)
        assert restored["model_type"] == family and "auto_map" not in restored
        assert restored["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                                              "mistral": "MistralForCausalLM"}[family]]
        assert "base_model_type" not in restored["quantization_config"]
        assert wrap_config(restored) == config
        card = (folder / "README.md").read_text()
        assert "AutoModelForCausalLM.from_pretrained(" in card and "trust_remote_code=True" in card
        assert f"qdlm_{family}" in card


@pytest.mark.parametrize("sc", [True, False], ids=["default", "no-self-contained"])
def test_installed_qdlm_export_loads_without_trust_remote_code(sc, sources, exports):
    """With the package imported, a dense export is its registered local class: no remote code runs."""
    from transformers import AutoModelForCausalLM

    from qdlm_export.core.remote_code import remote_code_files

    folder = exports["qwen2", sc]
    assert remote_code_files(folder) == []  # eval/bench need no --trust-remote-code for it: no folder code runs
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model).__module__ == "qdlm_export.loader.native_wrappers"
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    assert rel(logits, reference_logits("qwen2", sources["qwen2"], folder)) <= 1e-5


# ----------------------------------------------------------------------------------- AutoModel (base)
# AutoModel of a dense causal LM builds the base model (Qwen2Model: no LM head, no `model.` level);
# transformers strips the `model.` base_model_prefix from the checkpoint's keys, and the loader maps
# quantization_config's module names the same way.
def causal_hidden_states(folder: Path) -> torch.Tensor:
    """The base model's output inside the causal LM load: ``model.model(...)``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        return model.model(input_ids=TOKENS).last_hidden_state


def reference_hidden_states(family: str, source: Path, folder: Path) -> torch.Tensor:
    """The original base model in float64 with each listed linear replaced by the format spec's
    dequantization (names without the causal LM's ``model.``)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source, dtype=torch.float64)
    for name, weight in dequantized_weights(folder).items():
        model.get_submodule(name.removeprefix("model.")).weight.data = weight
    with torch.no_grad():
        return model(input_ids=TOKENS).last_hidden_state


@pytest.mark.parametrize("sc", [True, False], ids=["default", "no-self-contained"])
@pytest.mark.parametrize("family", sorted(DENSE))
def test_automodel_base_loads_with_the_package(family, sc, sources, exports):
    """With the package imported, no trust_remote_code: the base model, every listed linear quantized."""
    from transformers import AutoModel

    from qdlm_export.loader.hf_quantizer import QdlmLinear

    folder = exports[family, sc]
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    assert not hasattr(model, "lm_head") and not hasattr(model, "model")  # the base model itself
    listed = json.loads((folder / "config.json").read_text())["quantization_config"]["quantized_modules"]
    assert listed and all(isinstance(model.get_submodule(n.removeprefix("model.")), QdlmLinear) for n in listed)
    with torch.no_grad():
        hidden = model(input_ids=TOKENS).last_hidden_state
    assert torch.equal(hidden, causal_hidden_states(folder))
    assert rel(hidden, reference_hidden_states(family, sources[family], folder)) <= 1e-5


@pytest.mark.parametrize("family", sorted(DENSE))
def test_automodel_base_loads_in_stock_transformers(family, sources, exports, stock):
    """qdlm_export blocked: refused without trust_remote_code; with it, the folder's own code loads the
    base model, with the hidden states of the causal LM load."""
    got = stock[f"{family}-base"]
    assert got["False"].get("refused") == "ValueError" and "trust_remote_code=True" in got["False"]["message"], got
    assert "loaded" in got["True"], got
    assert got["True"]["loaded"].startswith("transformers_modules.")
    hidden = torch.load(got["True"]["logits"])
    folder = exports[family, True]
    assert hidden.shape == (*TOKENS.shape, 128)
    assert torch.equal(hidden, causal_hidden_states(folder))
    assert rel(hidden, reference_hidden_states(family, sources[family], folder)) <= 1e-5


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.k_proj.weight_scale", "model.norm.weight"])
def test_automodel_base_is_strict_too(key, exports, tmp_path):
    """Loading strictness holds for the base model, and names the tensor as the checkpoint spells it."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from qdlm_export.errors import CheckpointError

    folder = tmp_path / "broken"
    shutil.copytree(exports["qwen2", True], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        AutoModel.from_pretrained(folder, dtype=torch.float32)
    assert str(info.value).startswith(f"tensor {key} ") and ("missing" in str(info.value))


def test_checkpoint_prefix_only_for_a_base_model():
    """The mapping rule: the prefix is stripped only when the model is the base model (the prefix names
    none of its modules) and every listed name carries it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    from qdlm_export.loader.hf_quantizer import checkpoint_prefix

    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert checkpoint_prefix(Qwen2Model(config), names) == "model"
    assert checkpoint_prefix(Qwen2ForCausalLM(config), names) == ""  # it has `model`: names are paths as they are
    assert checkpoint_prefix(Qwen2Model(config), ["layers.0.self_attn.q_proj"]) == ""
    assert checkpoint_prefix(Qwen2Model(config), [*names, "lm_head"]) == ""
    assert checkpoint_prefix(Qwen2Model(config), []) == ""


def test_conversions_restore_the_source_model_type(exports, tmp_path):
    """Other formats are read by stock loaders: original model_type/architectures, no wrapper, no guard."""
    for (family, sc), folder in exports.items():
        if family in ("dream",) or (family == "llama" and sc):
            continue  # one export per kind is enough; Dream's code is handled like LLaDA's
        out = convert(folder, tmp_path / f"{family}-{sc}-ct", "compressed-tensors")
        config = json.loads((out / "config.json").read_text())
        source = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        if family in DENSE:
            assert config["model_type"] == family and "auto_map" not in config
            assert config["architectures"] == source["quantization_config"]["base_architectures"]
        else:
            assert config["model_type"] == source["model_type"] and config["auto_map"] == source["auto_map"]
        names = sorted(p.name for p in out.glob("*.py"))
        assert not [n for n in names if n.startswith("qdlm_") or n.endswith("_qdlm.py")], names
        for p in out.glob("*.py"):
            assert MARKER not in p.read_text() and GUARD_MARKER not in p.read_text()


def test_make_self_contained_upgrades_other_native_layouts(exports, tmp_path):
    """A --no-self-contained export becomes self-contained (the loader replaces the guard), and a dense
    native checkpoint written before this layout (plain model_type) is wrapped first."""
    guarded = tmp_path / "llada"
    shutil.copytree(exports["llada", False], guarded)
    make_self_contained(guarded)
    for name in ("modeling_llada.py", "configuration_llada.py"):
        text = (guarded / name).read_text()
        assert GUARD_MARKER not in text and text.count(MARKER) == 1
    assert is_self_contained(guarded)

    old = tmp_path / "old-qwen2"
    shutil.copytree(exports["qwen2", False], old)
    for name in ("configuration_qdlm.py", "modeling_qdlm.py"):
        (old / name).unlink()
    (old / "config.json").write_text(json.dumps(unwrap_config(json.loads((old / "config.json").read_text()))))
    make_self_contained(old)
    config = json.loads((old / "config.json").read_text())
    assert config["model_type"] == "qdlm_qwen2" and is_self_contained(old)
    assert torch.equal(in_package_logits("qwen2", old), in_package_logits("qwen2", exports["qwen2", True]))
