"""Hub ids wherever a checkpoint is read: `inspect`, `convert` (and `eval`, `bench` through the same
function) against the loopback fake Hub, with --revision, safetensors only, and offline mode."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import constants

from tests.cli_runner import run_cli
from tests.hub_server import FAKE_TOKEN

REPO = "tester/tiny-w4"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qdlm_export.fixtures import build_tiny_model
    from qdlm_export.quantize.api import make_config, quantize

    root = tmp_path_factory.mktemp("hub_ids")
    source = build_tiny_model("llada", root / "tiny-llada", seed=3)
    out = root / "ckpt"
    quantize(str(source), out, make_config("rtn", bits=4), trust_remote_code=True, verify=False)
    return out


def _push(hub, folder, revision=None):
    from qdlm_export.hub.push import push_checkpoint

    push_checkpoint(folder, REPO, endpoint=hub.endpoint, revision=revision)


def _description(monkeypatch, capsys, *args):
    code, out, err = run_cli(monkeypatch, capsys, "inspect", *args, "--device", "cpu", "--json")
    assert code == 0, err
    return json.loads(out)


def _comparable(description: dict) -> dict:
    """What inspect says about the checkpoint, without where it lies on disk."""
    return {k: v for k, v in description.items() if k != "path"}


def test_inspect_of_a_hub_id_reports_what_the_local_folder_does(monkeypatch, capsys, checkpoint, hub):
    _push(hub, checkpoint)
    local = _description(monkeypatch, capsys, str(checkpoint))
    remote = _description(monkeypatch, capsys, REPO)
    assert _comparable(remote) == _comparable(local)
    assert remote["valid"] and remote["quantized_modules"] == local["quantized_modules"]
    assert "models--tester--tiny-w4" in remote["path"]  # read from huggingface_hub's cache
    assert "model.safetensors" in hub.downloads and "config.json" in hub.downloads


def test_inspect_table_names_the_hub_id(monkeypatch, capsys, checkpoint, hub):
    _push(hub, checkpoint)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", REPO, "--device", "cpu")
    assert code == 0, err
    assert REPO in out and "validation" in out
    assert FAKE_TOKEN not in out + err


def test_revision_is_passed_through(monkeypatch, capsys, checkpoint, hub):
    _push(hub, checkpoint, revision="w4-g128")  # a branch only: main holds no checkpoint
    assert "config.json" not in hub.repos[REPO].trees.get("main", {})
    local = _description(monkeypatch, capsys, str(checkpoint))
    assert _comparable(_description(monkeypatch, capsys, REPO, "--revision", "w4-g128")) == _comparable(local)
    info_paths = {r.path for r in hub.requests if r.endpoint == "repo-info"}
    assert any(p.endswith("/revision/w4-g128") for p in info_paths)

    code, _, err = run_cli(monkeypatch, capsys, "inspect", REPO, "--revision", "no-such-branch")
    assert code == 1 and "no-such-branch" in err and "Traceback" not in err


def test_pickles_are_never_downloaded(monkeypatch, capsys, checkpoint, hub):
    _push(hub, checkpoint)
    tree = hub.repos[REPO].trees["main"]
    tree.update({"pytorch_model.bin": b"pickle", "training_args.pt": b"pickle", "extra/optimizer.pkl": b"pickle"})
    _description(monkeypatch, capsys, REPO)
    assert hub.downloads and not [p for p in hub.downloads if p.endswith((".bin", ".pt", ".pkl"))]
    assert not [p for p in hub.downloads if p not in tree]  # and nothing that does not exist


def test_convert_reads_a_hub_id(monkeypatch, capsys, checkpoint, hub, tmp_path):
    _push(hub, checkpoint)
    out_dir = tmp_path / "ct"
    code, out, err = run_cli(monkeypatch, capsys, "convert", REPO, "--to", "compressed-tensors", "--out", str(out_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["format"] == "compressed-tensors"
    assert (out_dir / "config.json").is_file() and list(out_dir.glob("*.safetensors"))


def test_bench_reads_a_hub_id_at_its_revision(monkeypatch, capsys, checkpoint, hub):
    """The download reaches the benchmark, which then needs the original model: this checkpoint was
    made from a local folder that the Hub copy cannot point to, and bench says so."""
    _push(hub, checkpoint, revision="w4-g128")
    code, out, err = run_cli(
        monkeypatch, capsys, "bench", REPO, "--revision", "w4-g128", "--no-kernels", "--seqlen", "16",
        "--repetitions", "1", "--device", "cpu", "--trust-remote-code", "--json",
    )
    assert code == 1 and "models--tester--tiny-w4" in err and "made from the local model folder tiny-llada" in err
    assert "Traceback" not in err
    assert "model.safetensors" in hub.downloads


def test_offline_mode_with_an_uncached_id_is_a_clear_error(monkeypatch, capsys, checkpoint, hub):
    _push(hub, checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", REPO)
    assert code == 1
    assert REPO in err and "not in the local Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err and FAKE_TOKEN not in out + err
    assert len(hub.requests) == before  # offline means no request at all


def test_offline_mode_uses_a_cached_id(monkeypatch, capsys, checkpoint, hub):
    _push(hub, checkpoint)
    online = _description(monkeypatch, capsys, REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    assert _description(monkeypatch, capsys, REPO) == online
    assert len(hub.requests) == before


def test_unknown_repo_and_local_revision_are_clear_errors(monkeypatch, capsys, checkpoint, hub):
    code, _, err = run_cli(monkeypatch, capsys, "inspect", "tester/absent")
    assert code == 1 and "tester/absent" in err and "neither a local folder nor a repository" in err
    assert "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(checkpoint), "--revision", "main")
    assert code == 2 and "--revision" in err and "Traceback" not in err


def test_a_missing_local_path_keeps_its_error(monkeypatch, capsys, tmp_path, hub):
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "o"))
    assert code == 1 and "does not exist" in err
    assert not hub.requests  # an absolute path is never looked up on the Hub
