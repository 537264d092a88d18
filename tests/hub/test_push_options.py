"""`push` like `hf upload` against the loopback Hub: stale weights deleted on re-push, --create-pr,
--include/--exclude, --delete, --token never shown, the large-folder upload (issue 15, item 3)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import constants

from qdlm_export.errors import ConfigError, HubError
from qdlm_export.hub.push import push_checkpoint
from tests.cli_runner import run_cli
from tests.hub.test_hub import REPO, make_checkpoint
from tests.hub_server import FAKE_TOKEN


def _reshard(folder, shards: int) -> None:
    """Rewrite ``folder``'s weights as ``shards`` files with an index (or one model.safetensors)."""
    from safetensors.torch import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
    for f in files:
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "llada-w4")


def test_repush_that_changes_sharding_leaves_no_stale_file(fake_hub, ckpt):
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    assert "model.safetensors" in fake_hub.repos[REPO].files
    _reshard(ckpt, 2)
    result = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    remote = set(fake_hub.repos[REPO].files)
    assert "model.safetensors" not in remote and result.deleted == ("model.safetensors",)
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"} <= remote
    assert fake_hub.last_commit.deleted == ["model.safetensors"]
    # and back to a single file: the shards and their index go
    _reshard(ckpt, 1)
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    remote = set(fake_hub.repos[REPO].files)
    assert not any(p.startswith("model-0") for p in remote) and "model.safetensors.index.json" not in remote
    assert remote == {p.relative_to(ckpt).as_posix() for p in ckpt.iterdir() if p.is_file()}


def test_no_delete_stale_keeps_old_weights_and_delete_patterns_remove_files(fake_hub, ckpt):
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    fake_hub.repos[REPO].files["notes/old.txt"] = b"old"
    _reshard(ckpt, 2)
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, delete_stale=False, delete=["notes/*"])
    remote = set(fake_hub.repos[REPO].files)
    assert "model.safetensors" in remote and "notes/old.txt" not in remote


def test_create_pr_commits_to_a_pr_ref_and_leaves_main(fake_hub, ckpt):
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    main_before = dict(fake_hub.repos[REPO].files)
    readme_before = (ckpt / "README.md").read_bytes()
    result = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, create_pr=True, license="mit")
    assert result.pr_url and result.pr_url.endswith(f"/{REPO}/discussions/1")
    commit = fake_hub.last_commit
    assert commit.revision == "refs/pr/1" and commit.query.get("create_pr") == ["1"]
    assert fake_hub.repos[REPO].files == main_before  # main untouched
    assert b"license: mit" in fake_hub.repos[REPO].trees["refs/pr/1"]["README.md"]
    assert (ckpt / "README.md").read_bytes() == readme_before  # a PR may never be merged


def test_include_and_exclude_filter_the_upload(fake_hub, ckpt):
    result = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, exclude=["*.py", "tokenizer*"])
    sent = set(fake_hub.last_commit.files)
    assert not any(p.endswith(".py") or p.startswith("tokenizer") for p in sent)
    assert {"config.json", "model.safetensors", "README.md"} <= sent
    assert "modeling_llada.py" in result.skipped
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, include=["*.json"])
    assert set(fake_hub.last_commit.files) == {"config.json", "generation_config.json", "qdlm_report.json",
                                               "tokenizer.json"}
    with pytest.raises(ConfigError, match="nothing"):
        push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, include=["*.nothing"])


def test_large_folder_cannot_open_a_pr(fake_hub, ckpt):
    with pytest.raises(ConfigError, match="pull request"):
        push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, large_folder=True, create_pr=True)
    assert fake_hub.requests == []


def test_large_folder_upload_then_card_and_deletions(fake_hub, ckpt, monkeypatch):
    """Above the threshold the files go through upload_large_folder, then one commit holds the
    rendered card and the stale-file deletions."""
    import qdlm_export.hub.push as push_module

    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    _reshard(ckpt, 2)
    monkeypatch.setattr(push_module, "LARGE_FOLDER_BYTES", 1)
    result = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    remote = fake_hub.repos[REPO].files
    assert "model.safetensors" not in remote and result.deleted == ("model.safetensors",)
    for name in ("model-00001-of-00002.safetensors", "config.json", "README.md"):
        assert remote[name] == (ckpt / name).read_bytes(), name
    assert len(fake_hub.commits) >= 3 and fake_hub.last_commit.deleted == ["model.safetensors"]


def test_token_option_is_used_and_never_shown(monkeypatch, capsys, ckpt, fake_hub):
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.delenv("HF_TOKEN")
    secret = "hf_cliTOKENoptionX9secret"
    code, out, err = run_cli(monkeypatch, capsys, "push", str(ckpt), REPO, "--token", secret, "--json")
    assert code == 0, err
    assert {r.headers["authorization"] for r in fake_hub.requests} == {f"Bearer {secret}"}
    assert secret not in out + err and secret[8:] not in out + err
    fake_hub.echo_token_in_errors = True  # a hostile server quoting the header back
    fake_hub.fail("commit", 500)
    code, out, err = run_cli(monkeypatch, capsys, "push", str(ckpt), REPO, "--token", secret, "--create-pr")
    assert code != 0 and "500" in err
    assert secret not in out + err and secret[8:] not in out + err


def test_create_pr_through_the_cli(monkeypatch, capsys, ckpt, fake_hub):
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    code, out, err = run_cli(monkeypatch, capsys, "push", str(ckpt), REPO, "--create-pr", "--exclude", "*.py")
    assert code == 0, err
    assert "pull request" in out and "/discussions/1" in out
    assert fake_hub.last_commit.revision == "refs/pr/1"
    assert not any(p.endswith(".py") for p in fake_hub.last_commit.files)
    assert FAKE_TOKEN not in out + err


def test_hub_errors_still_map_with_new_options(fake_hub, ckpt, monkeypatch):
    fake_hub.fail("tree", 500)
    # huggingface_hub retries a failed GET 5 times with growing waits (~23 s); the retries still run
    from huggingface_hub.utils import _http

    waits = []
    monkeypatch.setattr(_http.time, "sleep", waits.append)
    with pytest.raises(HubError, match="listing the files"):
        push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    assert waits, "the listing was not retried"
    assert not fake_hub.commits
