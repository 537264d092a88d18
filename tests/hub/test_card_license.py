"""The card's license, for a checkpoint made from a Hub model: taken from that model's own card as
downloaded with its weights (here from the loopback fake Hub into an empty cache), unless --license
names one; nothing when the card is not cached, and never a network request while rendering."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download

from qdlm_export.hub.card_metadata import CardInputs, resolve_inputs

BASE = "someorg/base-dllm"


def _base_repo(hub, license_: str) -> None:
    repo = hub.add_repo(BASE)
    repo.files["README.md"] = f"---\nlicense: {license_}\ntags:\n- dllm\n---\n# A base model\n".encode()
    repo.files["config.json"] = b"{}"


def test_the_license_comes_from_the_hub_base_models_card(hub, tmp_path: Path):
    _base_repo(hub, "apache-2.0")
    # what quantizing from the Hub id downloads (quantize/source.py's allow-list includes the card)
    snapshot_download(BASE, allow_patterns=["*.json", "README.md"])
    served = len(hub.downloads)
    assert resolve_inputs(tmp_path, BASE, CardInputs()) == ("apache-2.0", BASE)
    assert resolve_inputs(tmp_path, BASE, CardInputs(license="mit")) == ("mit", BASE)  # --license wins
    assert len(hub.downloads) == served  # rendering asked the Hub nothing


def test_no_license_when_the_card_was_not_downloaded(hub, tmp_path: Path):
    _base_repo(hub, "apache-2.0")
    assert resolve_inputs(tmp_path, BASE, CardInputs()) == (None, BASE)
    assert hub.downloads == [] and hub.requests == []
