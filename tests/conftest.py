"""Shared fixtures: tiny architecture-faithful models built once per session from a seed."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the real Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# eval caches the original model's results (eval/result_cache.py): never in the user's cache during tests
os.environ.setdefault("QDLM_CACHE", tempfile.mkdtemp(prefix="qdlm-cache-"))


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# Triton kernels are tested on the CPU through Triton's interpreter. The variable must be set before
# the first kernel is defined (see qdlm_export/kernels/_triton.py), so it is set here, at collection.
# On a GPU machine the kernels compile for real unless the caller sets TRITON_INTERPRET=1 itself.
if "TRITON_INTERPRET" not in os.environ and _no_cuda():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    from qdlm_export.fixtures import build_tiny_model

    return build_tiny_model("llada", tmp_path_factory.mktemp("models") / "tiny-llada", seed=1)


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory):
    from qdlm_export.fixtures import build_tiny_model

    return build_tiny_model("dream", tmp_path_factory.mktemp("models") / "tiny-dream", seed=2)


@pytest.fixture(scope="session")
def published_llada(tmp_path_factory):
    """The trained tiny LLaDA with remote code "as published" (fixtures/published/llada: the public
    checkpoints' interfaces and transformers-5 incompatibilities, unrepaired)."""
    from qdlm_export.fixtures import build_tiny_model

    return build_tiny_model("llada", tmp_path_factory.mktemp("models") / "published-llada", published=True)


@pytest.fixture(scope="session")
def published_dream(tmp_path_factory):
    """The trained tiny Dream with remote code "as published" (fixtures/published/dream)."""
    from qdlm_export.fixtures import build_tiny_model

    return build_tiny_model("dream", tmp_path_factory.mktemp("models") / "published-dream", published=True)


@pytest.fixture(params=["llada", "dream"])
def tiny_model(request, tiny_llada, tiny_dream):
    """Each tiny dLLM family in turn: (family, folder)."""
    return request.param, {"llada": tiny_llada, "dream": tiny_dream}[request.param]


def pytest_configure(config):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep test output readable


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: solvers and rotation searches are loops of small ops, which
    OpenMP spinning slows down many-fold on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _kernel_backend_setting_read_again():
    """The kernels read QDLM_KERNEL_BACKEND once per process (kernels/registry.py). A test that sets it
    calls ``refresh_backend_setting()`` (tests/kernels: the ``force_backend`` fixture); this re-reads
    it before each test and after it, once monkeypatch has restored the environment."""
    import sys

    def refresh() -> None:
        registry = sys.modules.get("qdlm_export.kernels.registry")  # never imported here for nothing
        if registry is not None:
            registry.refresh_backend_setting()

    refresh()
    yield
    refresh()
