"""The card's license, for a checkpoint made from a Hub model: taken from that model's own card on
the Hub (here the loopback fake Hub), unless --license names one; nothing when the card cannot be
read (offline), rather than a guess."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants

from qdlm_export.hub.card_metadata import CardInputs, resolve_inputs

BASE = "someorg/base-dllm"


def _base_card(hub, license_: str) -> None:
    repo = hub.add_repo(BASE)
    repo.files["README.md"] = f"---\nlicense: {license_}\ntags:\n- dllm\n---\n# A base model\n".encode()


def test_the_license_comes_from_the_hub_base_models_card(hub, tmp_path: Path):
    _base_card(hub, "apache-2.0")
    license_, base = resolve_inputs(tmp_path, BASE, CardInputs())
    assert (license_, base) == ("apache-2.0", BASE)
    assert "README.md" in hub.downloads


def test_a_given_license_wins_and_nothing_is_fetched(hub, tmp_path: Path):
    _base_card(hub, "apache-2.0")
    assert resolve_inputs(tmp_path, BASE, CardInputs(license="mit")) == ("mit", BASE)
    assert "README.md" not in hub.downloads


def test_no_license_when_the_card_cannot_be_read(hub, tmp_path: Path, monkeypatch):
    assert resolve_inputs(tmp_path, "someorg/no-such-model", CardInputs()) == (None, "someorg/no-such-model")
    _base_card(hub, "apache-2.0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: not even asked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_inputs(tmp_path, BASE, CardInputs()) == (None, BASE)
    assert "README.md" not in hub.downloads
