"""Fixtures of the Hub tests: the loopback fake Hub (tests/hub_server.py) and the environment that
points huggingface_hub at it."""

from __future__ import annotations

import pytest

from tests.hub_server import FAKE_TOKEN, FakeHub


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Environment for talking to a fake Hub: a fake HF_TOKEN, no Xet, no offline mode, no stored login."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # huggingface_hub reads these at import time: patch the parsed values too.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_token_absent"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_stored_tokens_absent"))
    return FAKE_TOKEN


@pytest.fixture
def fake_hub(hub_env):
    """A started :class:`FakeHub`, stopped at teardown. Also sets up :func:`hub_env`."""
    hub = FakeHub().start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def hub(fake_hub, monkeypatch, tmp_path):
    """The fake Hub as HF_ENDPOINT (both parsed forms huggingface_hub keeps), with an empty cache:
    downloads (snapshot_download, hf_hub_download) go to it too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return fake_hub
