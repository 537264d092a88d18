"""Fixtures of the kernel tests: fresh random inputs, and the backend setting under the test's control."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def native_build_state(**state):
    """Run the body with the native kernels' build state (kernels/cpu_native.py) replaced by ``state``
    (empty: built or loaded afresh at the next use); the process's state comes back afterwards, and
    the registry chooses again both times."""
    from qdlm_export.kernels import cpu_native

    saved = dict(cpu_native._STATE)
    cpu_native._STATE.clear()
    cpu_native._STATE.update(state)
    forget_selections()
    try:
        yield
    finally:
        cpu_native._STATE.clear()
        cpu_native._STATE.update(saved)
        forget_selections()


@pytest.fixture
def native_off():
    """The native int4 kernels unavailable for this test, so the backends beneath them run."""
    with native_build_state(lib=None, reason="turned off for this test"):
        yield


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """The native kernels built or loaded afresh at their next use, with the cache in tmp_path."""
    from qdlm_export.kernels import cpu_native

    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path / "cache"))
    with native_build_state():
        yield tmp_path
