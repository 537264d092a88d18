"""`qdlm-export push` uploads only a valid checkpoint, and only what belongs to it.

Driven through the real CLI entry point in process (tests/cli_runner.py) against the loopback fake
Hub (tests/hub_server.py). Every refusal: exit 1, no traceback, no "internal error", the message
names what is wrong, not one request reached the Hub, and the folder is byte-for-byte as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import save_file

from tests.cli_runner import run_cli
from tests.hub_server import FAKE_TOKEN

REPO = "me/tiny-w4"
Q = "model.transformer.blocks.0.q_proj"


@pytest.fixture(scope="module")
def written(tiny_llada, tmp_path_factory) -> Path:
    from qdlm_export.quantize.api import make_config, quantize

    out = tmp_path_factory.mktemp("push") / "ckpt"
    quantize(str(tiny_llada), out, make_config("rtn", bits=4, group_size=64), trust_remote_code=True, verify=False)
    return out


@pytest.fixture
def ckpt(written, tmp_path) -> Path:
    folder = tmp_path / "work" / "ckpt"
    shutil.copytree(written, folder)
    return folder


@pytest.fixture
def hub(fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.delenv("QDLM_HUB_TIMEOUT", raising=False)
    return fake_hub


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones and links included): its content hash or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def push(monkeypatch, capsys, folder: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "push", str(folder), REPO, *extra)


def assert_refused(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 1, (code, out, err)
    assert "Traceback" not in out + err and "internal error" not in out + err
    assert "Uploaded" not in out
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert FAKE_TOKEN not in out + err


def _tensors(folder: Path, name: str = "model.safetensors"):
    with safe_open(folder / name, "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}


def _shard(folder: Path, outside: Path | None = None, *, absolute: bool = False) -> Path:
    """Split model.safetensors in two shards + index; the q_proj tensors' shard moves to ``outside``
    (a valid file there), and the index points at it by ``../`` or by an absolute path."""
    tensors, metadata = _tensors(folder)
    (folder / "model.safetensors").unlink()
    first = {k: v for k, v in tensors.items() if not k.startswith(Q + ".")}
    second = {k: v for k, v in tensors.items() if k.startswith(Q + ".")}
    save_file(first, folder / "model-00001-of-00002.safetensors", metadata=metadata)
    second_name = "model-00002-of-00002.safetensors"
    if outside is None:
        save_file(second, folder / second_name, metadata=metadata)
    else:
        save_file(second, outside / second_name, metadata=metadata)
        second_name = str(outside / second_name) if absolute else os.path.relpath(outside / second_name, folder)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: second_name for k in second})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ----------------------------------------------------------------------------------- refusals
def _staging_by_name(ckpt: Path) -> Path:
    staging = ckpt.parent / ".ckpt.partial-k3j2h1g0"
    ckpt.rename(staging)
    return staging


def _staging_by_marker(ckpt: Path) -> Path:
    from qdlm_export.format.output import INCOMPLETE_MARKER

    (ckpt / INCOMPLETE_MARKER).write_text("{}")
    return ckpt


def _missing_tensor(ckpt: Path) -> Path:
    tensors, metadata = _tensors(ckpt)
    del tensors[f"{Q}.weight_scale"]
    save_file(tensors, ckpt / "model.safetensors", metadata=metadata)
    return ckpt


def _missing_full_precision(key: str):
    """A tensor quantization_config does not list (embedding, norm): caught by the manifest of written
    tensors in qdlm_report.json, not at load time only."""
    def damage(ckpt: Path) -> Path:
        tensors, metadata = _tensors(ckpt)
        del tensors[key]
        save_file(tensors, ckpt / "model.safetensors", metadata=metadata)
        return ckpt
    return damage


EMBEDDING = "model.transformer.wte.weight"
NORM = "model.transformer.blocks.0.attn_norm.weight"


def _truncated(ckpt: Path) -> Path:
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    return ckpt


def _dotdot_index(ckpt: Path) -> Path:
    return _shard(ckpt, ckpt.parent)


def _absolute_index(ckpt: Path) -> Path:
    return _shard(ckpt, ckpt.parent, absolute=True)


def _symlink_out(ckpt: Path) -> Path:
    secret = ckpt.parent / "token.txt"
    secret.write_text(f"{FAKE_TOKEN}\n")
    (ckpt / "notes.txt").symlink_to(secret)
    return ckpt


def _symlinked_weights_out(ckpt: Path) -> Path:
    weights = ckpt / "model.safetensors"
    moved = ckpt.parent / "elsewhere.safetensors"
    weights.rename(moved)
    weights.symlink_to(moved)
    return ckpt


def _not_quantized(ckpt: Path) -> Path:
    """A full-precision model folder (here: the config without its quantization_config): the usual
    slip of pushing the source instead of the output."""
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


REFUSALS = {
    "not-quantized": (_not_quantized, ("config.json", "quantization_config", "not a quantized checkpoint")),
    "staging-by-name": (_staging_by_name, ("staging folder", "partial")),
    "staging-by-marker": (_staging_by_marker, ("staging folder", ".qdlm-incomplete")),
    "missing-tensor": (_missing_tensor, (f"{Q}.weight_scale", "missing", "incomplete or corrupted")),
    "missing-embedding": (_missing_full_precision(EMBEDDING), (EMBEDDING, "missing", "model.safetensors",
                                                               "qdlm_report.json", "incomplete or corrupted")),
    "missing-norm": (_missing_full_precision(NORM), (NORM, "missing", "model.safetensors", "qdlm_report.json")),
    "truncated-file": (_truncated, ("model.safetensors", "truncated")),
    "dotdot-in-index": (_dotdot_index, ("model.safetensors.index.json", "../model-00002-of-00002.safetensors",
                                        "outside")),
    "absolute-in-index": (_absolute_index, ("model.safetensors.index.json", "outside")),
    "symlink-out": (_symlink_out, ("notes.txt", "symbolic link", "outside")),
    "symlinked-weights-out": (_symlinked_weights_out, ("model.safetensors", "symbolic link", "outside")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_push_refuses_before_any_request(monkeypatch, capsys, hub, ckpt, case):
    damage, needles = REFUSALS[case]
    folder = damage(ckpt)
    before = snapshot(folder.parent)
    code, out, err = push(monkeypatch, capsys, folder)
    assert_refused(code, out, err, *needles)
    assert hub.requests == []  # nothing sent
    assert snapshot(folder.parent) == before


@pytest.mark.parametrize("case", list(REFUSALS))
def test_inspect_refuses_the_same_folders(monkeypatch, capsys, ckpt, case):
    """One validation: what push refuses, inspect refuses with the same words (and reads nothing
    outside the folder)."""
    damage, needles = REFUSALS[case]
    folder = damage(ckpt)
    before = snapshot(folder.parent)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(folder))
    assert_refused(code, out, err, *needles)
    assert snapshot(folder.parent) == before


def test_the_intact_copy_is_pushed(monkeypatch, capsys, hub, ckpt):
    """Control for the refusals: the same copy, undamaged, goes through."""
    code, out, err = push(monkeypatch, capsys, ckpt, "--json")
    assert code == 0, err
    assert hub.last_commit.files["model.safetensors"] == (ckpt / "model.safetensors").read_bytes()


def test_a_hub_cache_snapshot_is_a_valid_folder(monkeypatch, capsys, hub, written, tmp_path):
    """A snapshot of the Hugging Face cache is made of links into its repository's blobs: those links
    stay inside what was downloaded, so inspect and push accept it (and push uploads the content)."""
    repo = tmp_path / "hub" / "models--me--tiny-w4"
    snap, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in written.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(snap))
    assert code == 0, err
    code, _, err = push(monkeypatch, capsys, snap)
    assert code == 0, err
    assert hub.last_commit.files["model.safetensors"] == (written / "model.safetensors").read_bytes()


def test_index_inside_the_folder_is_pushed_with_its_shards(monkeypatch, capsys, hub, ckpt):
    folder = _shard(ckpt)
    code, out, err = push(monkeypatch, capsys, folder, "--json")
    assert code == 0, err
    files = hub.last_commit.files
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        assert files[name] == (folder / name).read_bytes()


# ----------------------------------------------------------------------------------- allow-list
def test_pickles_hidden_files_and_strays_are_not_uploaded(monkeypatch, capsys, hub, ckpt):
    strays = {
        "extra.pkl": b"\x80\x04K\x01.",
        "optimizer.pt": b"PK\x03\x04pickle",
        "pytorch_model.bin": b"PK\x03\x04pickle",
        "training_args.bin": b"\x80\x04N.",
        "model.ckpt": b"\x80\x04N.",
        "weights.pth": b"\x80\x04N.",
        ".env": f"HF_TOKEN={FAKE_TOKEN}\n".encode(),
        "leftover.safetensors": (ckpt / "model.safetensors").read_bytes(),
        "core": b"\0" * 32,
    }
    for name, data in strays.items():
        (ckpt / name).write_bytes(data)
    (ckpt / "runs").mkdir()
    (ckpt / "runs" / "events.json").write_text("{}")
    (ckpt / "inside.json").symlink_to(ckpt / "generation_config.json")  # a link inside the folder is fine

    code, out, err = push(monkeypatch, capsys, ckpt, "--json")
    assert code == 0, err
    uploaded = set(hub.last_commit.files)
    assert not uploaded & set(strays)
    assert not any(p.startswith("runs") for p in uploaded)
    result = json.loads(out)
    assert set(result["skipped"]) >= set(strays) | {"runs/"}
    assert set(result["uploaded"]) == uploaded
    # What a checkpoint is made of did go, byte for byte.
    for name in ("config.json", "model.safetensors", "qdlm_report.json", "modeling_llada.py", "qdlm_loader.py",
                 "tokenizer.json", "generation_config.json"):
        assert hub.last_commit.files[name] == (ckpt / name).read_bytes(), name
    assert hub.last_commit.files["inside.json"] == (ckpt / "generation_config.json").read_bytes()
    assert FAKE_TOKEN not in out + err


# ----------------------------------------------------------------------------------- failures
def test_a_stalled_hub_times_out(monkeypatch, capsys, hub, ckpt):
    monkeypatch.setenv("QDLM_HUB_TIMEOUT", "1")
    hub.stall("commit")
    before = snapshot(ckpt.parent)
    started = time.monotonic()
    code, out, err = push(monkeypatch, capsys, ckpt)
    elapsed = time.monotonic() - started
    assert_refused(code, out, err, "did not answer within 1 s", "QDLM_HUB_TIMEOUT")
    assert elapsed < 15, elapsed
    assert hub.stalled and hub.stalled[0].endpoint == "commit"
    assert not hub.commits
    assert snapshot(ckpt.parent) == before


def test_a_stalled_repo_creation_times_out(monkeypatch, capsys, hub, ckpt):
    monkeypatch.setenv("QDLM_HUB_TIMEOUT", "1.5")
    hub.stall("create")
    code, out, err = push(monkeypatch, capsys, ckpt)
    assert_refused(code, out, err, "did not answer within 1.5 s", "creating the repository")


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan", "inf"])
def test_a_bad_timeout_setting_is_refused_before_any_request(monkeypatch, capsys, hub, ckpt, value):
    monkeypatch.setenv("QDLM_HUB_TIMEOUT", value)
    code, out, err = push(monkeypatch, capsys, ckpt)
    assert code == 2 and "Traceback" not in err and "internal error" not in err
    assert "QDLM_HUB_TIMEOUT" in err and "seconds" in err
    assert hub.requests == []


@pytest.mark.parametrize("endpoint,status", [("commit", 401), ("create", 401), ("commit", 403), ("commit", 500)])
@pytest.mark.parametrize("card", ["generated", "absent"])
def test_a_failed_push_leaves_local_files_as_they_were(monkeypatch, capsys, hub, ckpt, endpoint, status, card):
    """The card `quantize` wrote would be re-rendered with the repo id, and a missing one written: only
    after the Hub confirmed the commit, never on failure."""
    if card == "absent":
        (ckpt / "README.md").unlink()
    else:
        assert (ckpt / "README.md").is_file()
    hub.fail(endpoint, status)
    before = snapshot(ckpt.parent)
    code, out, err = push(monkeypatch, capsys, ckpt)
    assert_refused(code, out, err, str(status))
    assert snapshot(ckpt.parent) == before


def test_the_card_is_saved_locally_after_success(monkeypatch, capsys, hub, ckpt):
    (ckpt / "README.md").unlink()
    code, out, err = push(monkeypatch, capsys, ckpt)
    assert code == 0, err
    assert (ckpt / "README.md").read_bytes() == hub.last_commit.files["README.md"]
    assert f'from_pretrained("{REPO}"' in (ckpt / "README.md").read_text()
