"""Fixtures of the kernel tests: fresh random inputs, and the backend setting under the test's control."""

from __future__ import annotations

import pytest

from qdlm_export.kernels import ENV_VAR, refresh_backend_setting
from qdlm_export.kernels.registry import forget_selections
from tests.kernel_inputs import fresh_generator


@pytest.fixture
def gen():
    return fresh_generator()


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Every kernel test starts from ``auto``, whatever the caller's environment says."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    refresh_backend_setting()


@pytest.fixture
def force_backend(monkeypatch):
    """``force_backend("triton")``: set QDLM_KERNEL_BACKEND for this test and have the kernels read it
    (they read it once per process; tests/conftest.py re-reads it after the test)."""

    def force(value: str) -> None:
        monkeypatch.setenv(ENV_VAR, value)
        refresh_backend_setting()

    return force


@pytest.fixture
def native_off(monkeypatch):
    """The native int4 kernels (kernels/cpu_native.py) unavailable for this test, so the backends
    beneath them run; the process's build state comes back afterwards."""
    from qdlm_export.kernels import cpu_native

    saved = dict(cpu_native._STATE)
    cpu_native._STATE.clear()
    cpu_native._STATE.update(lib=None, reason="turned off for this test")
    forget_selections()
    yield
    cpu_native._STATE.clear()
    cpu_native._STATE.update(saved)
    forget_selections()
