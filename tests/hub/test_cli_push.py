"""`qdlm-export push` through the CLI against a loopback fake Hub: success, 401 and 5xx."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import constants

from tests.hub_server import FAKE_TOKEN
from tests.cli_runner import run_cli


@pytest.fixture
def checkpoint(tmp_path, tiny_llada):
    from qdlm_export.quantize.api import make_config, quantize

    out = tmp_path / "ckpt"
    quantize(str(tiny_llada), out, make_config("rtn", bits=4), trust_remote_code=True, verify=False)
    return out


def test_push_uploads_the_folder_with_card(monkeypatch, capsys, checkpoint, fake_hub):
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    code, out, err = run_cli(monkeypatch, capsys, "push", str(checkpoint), "me/tiny-w4", "--private", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["commit_oid"] == fake_hub.last_commit.oid
    files = fake_hub.last_commit.files
    for name in ("config.json", "model.safetensors", "README.md", "modeling_llada.py", "tokenizer.json"):
        assert files[name] == (checkpoint / name).read_bytes()
    card = files["README.md"].decode()
    assert "library_name: transformers" in card and "- qdlm" in card
    assert 'from_pretrained("me/tiny-w4"' in card  # re-rendered with the real repo id
    assert fake_hub.repos["me/tiny-w4"].private
    assert FAKE_TOKEN not in out + err


@pytest.mark.parametrize("status,needle", [(401, "hf auth login"), (500, "500"), (503, "503")])
def test_push_failures_are_clear_and_never_claim_success(monkeypatch, capsys, checkpoint, fake_hub, status, needle):
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    fake_hub.fail("commit", status)
    code, out, err = run_cli(monkeypatch, capsys, "push", str(checkpoint), "me/tiny-w4")
    assert code != 0
    assert needle in err and "Traceback" not in err
    assert "Uploaded" not in out + err
    assert FAKE_TOKEN not in out + err


def test_push_of_a_non_checkpoint_sends_nothing(monkeypatch, capsys, tmp_path, fake_hub):
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    code, _, err = run_cli(monkeypatch, capsys, "push", str(tmp_path), "me/x")
    assert code != 0 and "config.json" in err and "Traceback" not in err
    assert fake_hub.requests == []
