"""Self-contained checkpoints: LLaDA and Dream exports that load with torch + transformers only.

The decisive test loads both in a fresh interpreter in which ``import qdlm_export`` fails, and
compares the logits with the native loader's in this process (torch fallback: identical; the
vendored Triton kernel, run by the Triton interpreter on CPU: equal to float32 rounding).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import qdlm_export  # noqa: F401  (the native loader, for the reference logits)
from qdlm_export.errors import ConfigError
from qdlm_export.loader.selfcontained import MARKER, is_self_contained, loader_files, make_self_contained
from qdlm_export.quantize.api import make_config, quantize
from tests.isolation import BLOCKER, TOKENS, rel, run_isolated

SC_LOADER = BLOCKER + """
import json, os, sys, torch
from transformers import AutoModel

jobs = json.loads(sys.argv[1])
tokens = torch.load(sys.argv[2])
for job in jobs:
    os.environ["QDLM_KERNEL_BACKEND"] = job["backend"]
    model = AutoModel.from_pretrained(job["folder"], trust_remote_code=True, dtype=torch.float32)
    linear = model.get_submodule(job["linear"])
    kernels = sys.modules[type(linear).__module__.rsplit(".", 1)[0] + ".qdlm_kernels"]
    x = torch.zeros(1, linear.in_features)
    chosen = kernels.weight_only_backend(x, linear.spec.bits, linear.spec.group_size, linear.in_features)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    torch.save({"logits": logits, "class_module": type(linear).__module__, "backend": chosen}, job["out"])
leaked = sorted(k for k in sys.modules if k.startswith("qdlm_export"))
assert not leaked, leaked
print("isolated-ok")
"""

LINEARS = {"llada": "model.transformer.blocks.0.q_proj", "dream": "model.layers.0.self_attn.q_proj"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _add_online_hadamard(folder: Path) -> None:
    """Give the 256-input linears an online Hadamard before their input quantization. The weights were
    not rotated for it, so the model is not the original one, but both loaders must compute it alike:
    this exercises the copied transforms code."""
    config = json.loads((folder / "config.json").read_text())
    modules = config["quantization_config"]["transforms"]["modules"]
    for name, ops in modules.items():
        if name.endswith(("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj")):
            ops.insert(0, {"op": "hadamard", "size": 256, "stride": 1})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def exports(tiny_llada, tiny_dream, tmp_path_factory):
    """name -> (native folder, self-contained copy): LLaDA W4 g128 symmetric, Dream W3 g64 asymmetric
    (with q/k/v biases), and LLaDA W8A8 (dynamic per-token activations) with online Hadamards."""
    root = tmp_path_factory.mktemp("selfcontained")
    out = {}
    for family, source, method, options in (
        ("llada", tiny_llada, "rtn", dict(bits=4, group_size=128, symmetric=True)),
        ("dream", tiny_dream, "rtn", dict(bits=3, group_size=64, symmetric=False)),
        ("llada-wa", tiny_llada, "rtn-wa", dict(bits=8, act_bits=8)),
    ):
        native = root / f"{family}-native"
        quantize(str(source), native, make_config(method, **options), trust_remote_code=True, verify=False,
                 self_contained=False)
        if method == "rtn-wa":
            _add_online_hadamard(native)
        sc = root / f"{family}-sc"
        shutil.copytree(native, sc)
        make_self_contained(sc)
        out[family] = (native, sc)
    return out


@functools.cache
def native_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.fixture(scope="module")
def isolated(exports, tmp_path_factory):
    work = tmp_path_factory.mktemp("isolated")
    jobs = [
        {"folder": str(exports["llada"][1]), "linear": LINEARS["llada"], "backend": "auto", "out": str(work / "llada.pt")},
        {"folder": str(exports["dream"][1]), "linear": LINEARS["dream"], "backend": "auto", "out": str(work / "dream.pt")},
        {"folder": str(exports["llada-wa"][1]), "linear": LINEARS["llada"], "backend": "auto",
         "out": str(work / "llada-wa.pt")},
        # the vendored Triton kernel, forced and run by the Triton interpreter on CPU tensors
        {"folder": str(exports["llada"][1]), "linear": LINEARS["llada"], "backend": "triton",
         "out": str(work / "llada-triton.pt")},
    ]
    torch.save(TOKENS, work / "tokens.pt")
    if importlib.util.find_spec("triton") is None:
        jobs.pop()  # the Triton job needs triton (run by its interpreter on CPU)
    run_isolated(SC_LOADER, [json.dumps(jobs), str(work / "tokens.pt")], work, TRITON_INTERPRET="1")
    return {Path(j["out"]).stem: torch.load(j["out"]) for j in jobs}


@pytest.mark.parametrize("family", ["llada", "dream", "llada-wa"])
def test_loads_without_qdlm_export_and_matches_native(family, exports, isolated):
    got = isolated[family]
    assert got["class_module"].startswith("transformers_modules.")  # the checkpoint's own copy of the loader
    assert got["class_module"].endswith(".qdlm_loader")
    assert got["backend"] == "torch"  # CPU: the torch fallback
    assert torch.equal(got["logits"], native_logits(exports[family][0]))


def test_vendored_triton_kernel_runs(exports, isolated):
    if "llada-triton" not in isolated:
        pytest.skip("triton is not installed")
    got = isolated["llada-triton"]
    assert got["backend"] == "triton"
    assert rel(got["logits"], native_logits(exports["llada"][0])) <= 1e-5


def test_coexists_with_installed_qdlm_export(exports):
    """With qdlm_export imported first, its quantizer serves the self-contained folder too."""
    from transformers import AutoModel

    from qdlm_export.loader.hf_quantizer import QdlmLinear

    native, sc = exports["llada"]
    model = AutoModel.from_pretrained(sc, trust_remote_code=True, dtype=torch.float32)
    assert isinstance(model.get_submodule(LINEARS["llada"]), QdlmLinear)
    with torch.no_grad():
        assert torch.equal(model(input_ids=TOKENS).logits, native_logits(native))


def test_layout_and_idempotence(exports, tmp_path):
    native, sc = exports["dream"]
    assert is_self_contained(sc) and not is_self_contained(native)
    modeling = (sc / "modeling_dream.py").read_text()
    assert modeling.count(MARKER) == 1 and "from .qdlm_loader import register_with_transformers" in modeling
    again = tmp_path / "again"
    shutil.copytree(sc, again)
    make_self_contained(again)
    assert (again / "modeling_dream.py").read_text() == modeling
    assert json.loads((sc / "config.json").read_text())["quantization_config"]["quant_method"] == "qdlm"


def test_copies_need_only_torch_and_transformers(tmp_path):
    """What transformers checks on a Hub download: every file's unconditional imports are installed
    packages, and every relative import names a carried file."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    files = loader_files()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name in files:
        third_party = {m for m in get_imports(tmp_path / name) if m not in sys.stdlib_module_names and m != "__future__"}
        assert third_party <= {"torch", "transformers"}, (name, third_party)
        for rel_import in get_relative_imports(tmp_path / name):
            assert f"{rel_import}.py" in files, (name, rel_import)
        assert "qdlm_export" not in [line.split()[1] for line in text.splitlines() if line.startswith(("import ", "from "))]


def test_refusals(tiny_llada, exports, tmp_path):
    with pytest.raises(ConfigError, match="not a native qdlm checkpoint"):
        make_self_contained(tiny_llada)  # unquantized source
    plain = tmp_path / "plain"
    shutil.copytree(exports["llada"][0], plain)
    config = json.loads((plain / "config.json").read_text())
    del config["auto_map"]
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="not a remote-code model"):
        make_self_contained(plain)


def test_dispatch_shim_in_package():
    from qdlm_export.core.packing import pack_rows
    from qdlm_export.loader.remote_kernels import weight_only_backend, weight_only_linear

    x = torch.randn(3, 64)
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    scale = torch.rand(8, 2) + 0.5
    assert weight_only_backend(x, 4, 32, 64, backend="auto") == "torch"
    y = weight_only_linear(x, pack_rows(codes, 4), scale, None, 4, 32, 64)
    w = (codes.float() - 8).view(8, 2, 32).mul(scale.unsqueeze(-1)).view(8, 64)
    torch.testing.assert_close(y, x @ w.t())
    with pytest.raises(ValueError, match="not a kernel backend"):
        weight_only_backend(x, 4, 32, 64, backend="cuda")
