"""push_checkpoint and the model card, against the loopback fake Hub in tests/hub_server.py."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import pytest
import yaml

from tests.hub_server import FAKE_TOKEN, FakeHub

from qdlm_export.errors import HubError, QdlmError
from qdlm_export.hub.push import PushResult, push_checkpoint
from qdlm_export.hub.card import render_model_card, write_model_card

REPO = "tester/llada-8b-instruct-qdlm-w4"

QUANT_CONFIG = {
    "quant_method": "qdlm",
    "format_version": 1,
    "method": "rtn",
    "method_options": {},
    "weights": {"bits": 4, "group_size": 128, "symmetric": True, "scale_dtype": "float32"},
    "activations": None,
    "family": "llada",
    "dllm": {"mask_token_id": 126336, "logits_shift": False},
    "quantized_modules": ["model.transformer.blocks.0.q_proj", "model.transformer.blocks.0.k_proj"],
    "module_overrides": {},
    "modules_not_converted": ["model.transformer.ff_out"],
    "transforms": {},
    "provenance": {
        "source": "GSAI-ML/LLaDA-8B-Instruct",
        "tool": "qdlm-export",
        "tool_version": "0.1.0",
        "created": "2026-11-24T14:00:00Z",
        "command": "qdlm-export quantize GSAI-ML/LLaDA-8B-Instruct --method rtn --bits 4 --out out/llada-w4",
    },
}
REPORT = {
    "source": "GSAI-ML/LLaDA-8B-Instruct",
    "linear_params": 6979321856,
    "linear_bytes_original": 13958643712,
    "linear_bytes_quantized": 3709009920,
    "checkpoint_bytes": 5000000000,
    "source_checkpoint_bytes": 16000000000,
    "bits_per_weight": 4.25,
    "relative_output_error": 0.012,
    "calibration": None,  # RTN uses no calibration data
    "elapsed_s": 412.3,
    "eval": None,
    "display_names": {"method": "RTN (round-to-nearest)", "family": "LLaDA"},
}


def make_checkpoint(folder: Path, *, quant_config=QUANT_CONFIG, report=REPORT, auto_map=True) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "quantization_config": quant_config}
    if auto_map:
        config["auto_map"] = {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if report is not None:
        (folder / "qdlm_report.json").write_text(json.dumps(report, indent=2))
    if isinstance(quant_config, dict) and quant_config.get("quant_method") == "qdlm":
        # A complete qdlm checkpoint of its listed modules (8 x 128, W4 per 128-group): push validates it.
        gen = torch.Generator().manual_seed(0)
        tensors = {}
        for name in quant_config["quantized_modules"]:
            tensors[f"{name}.weight_packed"] = torch.randint(-(2**31), 2**31 - 1, (8, 16), dtype=torch.int32, generator=gen)
            tensors[f"{name}.weight_scale"] = torch.rand(8, 1, generator=gen) + 0.1
            tensors[f"{name}.weight_shape"] = torch.tensor([8, 128], dtype=torch.int64)
    else:
        tensors = {
            "model.transformer.blocks.0.q_proj.qweight": torch.arange(64, dtype=torch.int32).reshape(8, 8),
            "model.transformer.blocks.0.q_proj.scales": torch.linspace(0.1, 1.0, 8).reshape(8, 1),
        }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "generation_config.json").write_text('{"mask_token_id": 126336}\n')
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (folder / "modeling_llada.py").write_text("# remote code\nclass LLaDAModelLM: ...\n")
    (folder / "configuration_llada.py").write_text("# remote code\nclass LLaDAConfig: ...\n")
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def assert_no_token(*texts: str) -> None:
    for text in texts:
        assert FAKE_TOKEN not in text
        assert FAKE_TOKEN[8:] not in text  # not even a tail of it


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "llada-w4")


# ----------------------------------------------------------------------------------- success
def test_push_uploads_every_file_with_card_and_token(fake_hub, ckpt):
    result = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)

    assert isinstance(result, PushResult)
    commit = fake_hub.last_commit
    assert result.commit_oid == commit.oid
    assert result.commit_url.endswith(f"/{REPO}/commit/{commit.oid}")
    assert result.repo_url == f"{fake_hub.endpoint}/{REPO}"
    assert commit.repo_id == REPO and commit.revision == "main"
    assert "rtn" in commit.summary and "qdlm-export" in commit.summary

    # README.md was written into the folder, and the Hub got exactly the folder's bytes.
    assert (ckpt / "README.md").is_file()
    assert commit.files == folder_files(ckpt)

    meta = front_matter(commit.files["README.md"].decode())
    assert meta["base_model"] == "GSAI-ML/LLaDA-8B-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    for tag in ("qdlm", "qdlm-export", "rtn", "4-bit", "w4a16", "diffusion-llm"):
        assert tag in meta["tags"]

    # Every request carried the token from HF_TOKEN, and said who we are.
    assert fake_hub.requests and not fake_hub.unknown
    for req in fake_hub.requests:
        assert req.headers["authorization"] == f"Bearer {FAKE_TOKEN}"
        assert req.headers["user-agent"].startswith("qdlm-export/")
    assert fake_hub.requests[0].endpoint == "create"
    create = json.loads(fake_hub.requests_to("create")[0].body)
    assert create["name"] == REPO.split("/")[1] and create["organization"] == "tester"
    assert "visibility" not in create  # public unless asked: the namespace default applies
    assert fake_hub.repos[REPO].private is False


def test_push_keeps_existing_readme_and_custom_message(fake_hub, ckpt):
    (ckpt / "README.md").write_text("---\nlicense: mit\n---\n# Mine\n")
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, commit_message="my message")
    commit = fake_hub.last_commit
    assert commit.files["README.md"] == b"---\nlicense: mit\n---\n# Mine\n"
    assert commit.summary == "my message"


def test_untouched_generated_card_gets_the_repo_id(fake_hub, ckpt):
    write_model_card(ckpt)  # what `quantize` does, before the repo id is known
    assert f'from_pretrained("{REPO}"' not in (ckpt / "README.md").read_text()
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    readme = fake_hub.last_commit.files["README.md"].decode()
    assert f'from_pretrained("{REPO}", trust_remote_code=True' in readme
    assert readme == render_model_card(ckpt, REPO)


def test_push_skips_caches(fake_hub, ckpt):
    (ckpt / "__pycache__").mkdir()
    (ckpt / "__pycache__" / "modeling_llada.cpython-311.pyc").write_bytes(b"\0junk")
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    assert not any("__pycache__" in p for p in fake_hub.last_commit.files)


def test_a_full_precision_folder_is_refused_before_any_request(fake_hub, tmp_path):
    """push publishes quantized checkpoints, validated as inspect validates them; a folder without a
    quantization_config (typically the source model passed by mistake) never reaches the Hub."""
    from qdlm_export.errors import CheckpointError

    folder = make_checkpoint(tmp_path / "plain", quant_config=None, report=None)
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        push_checkpoint(folder, REPO, endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


def test_private_reaches_create(fake_hub, ckpt):
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, private=True)
    create = json.loads(fake_hub.requests_to("create")[0].body)
    assert create["visibility"] == "private"
    assert fake_hub.repos[REPO].private is True


def test_second_push_to_existing_repo(fake_hub, ckpt):
    first = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    second = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)  # create answers 409: fine
    assert len(fake_hub.commits) == 2 and first.commit_oid != second.commit_oid
    assert second.commit_oid == fake_hub.last_commit.oid


def test_revision_creates_branch_then_commits_there(fake_hub, ckpt):
    result = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, revision="w4-g128")
    assert [r.path for r in fake_hub.requests_to("branch")] == [f"/api/models/{REPO}/branch/w4-g128"]
    commit = fake_hub.last_commit
    assert commit.revision == "w4-g128" and result.commit_oid == commit.oid
    assert fake_hub.repos[REPO].branches["w4-g128"] == commit.oid
    # The branch exists now: a second push still works (409 from branch creation is fine).
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, revision="w4-g128")
    assert fake_hub.last_commit.revision == "w4-g128" and len(fake_hub.commits) == 2


def test_explicit_token_argument_wins(fake_hub, ckpt, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    other = "hf_explicitARGtoken123456"
    push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint, token=other)
    assert {r.headers["authorization"] for r in fake_hub.requests} == {f"Bearer {other}"}


def test_push_with_xet_enabled_uses_same_endpoints(fake_hub, ckpt, monkeypatch):
    """The default path when hf_xet is installed (pipelined upload); small files go as regular blobs."""
    pytest.importorskip("hf_xet")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    result = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    assert result.commit_oid == fake_hub.last_commit.oid
    assert fake_hub.last_commit.files == folder_files(ckpt)
    assert not fake_hub.unknown


# ----------------------------------------------------------------------------------- failures
def _push_failing(hub: FakeHub, ckpt: Path, caplog, capsys, **kw) -> HubError:
    from huggingface_hub import constants

    hub.echo_token_in_errors = True  # hostile server: its error bodies quote the Authorization header
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    # Also log each request as a curl command (huggingface_hub masks the header there).
    original_debug = constants.HF_DEBUG
    constants.HF_DEBUG = True
    try:
        return _push_failing_inner(hub, ckpt, caplog, capsys, **kw)
    finally:
        constants.HF_DEBUG = original_debug


def _push_failing_inner(hub: FakeHub, ckpt: Path, caplog, capsys, **kw) -> HubError:
    with pytest.raises(HubError) as info:
        push_checkpoint(ckpt, REPO, endpoint=hub.endpoint, **kw)
    err = info.value
    out = capsys.readouterr()
    assert "Request" in caplog.text and "curl" in caplog.text  # the logs really were captured
    assert_no_token(
        str(err),
        repr(err),
        err.message,
        err.hint or "",
        "".join(traceback.format_exception(err)),
        caplog.text,
        out.out,
        out.err,
    )
    return err


@pytest.mark.parametrize("endpoint", ["create", "commit"])
def test_401_is_an_authentication_error(fake_hub, ckpt, caplog, capsys, endpoint):
    fake_hub.fail(endpoint, 401)
    err = _push_failing(fake_hub, ckpt, caplog, capsys)
    assert "401" in err.message and "Authentication failed" in err.message
    assert "HF_TOKEN" in err.hint and "hf auth login" in err.hint
    assert err.status_code == 401
    assert not fake_hub.commits


def test_403_on_create_is_a_permission_error(fake_hub, ckpt, caplog, capsys):
    fake_hub.fail("create", 403)
    err = _push_failing(fake_hub, ckpt, caplog, capsys)
    assert "403" in err.message and "Permission denied" in err.message and "tester" in err.hint
    assert not fake_hub.commits


@pytest.mark.parametrize("status", [401, 403])
def test_existing_repo_with_token_that_cannot_create(fake_hub, ckpt, status):
    """A fine-grained token may write to a repo yet be refused creation: the push still goes through."""
    fake_hub.add_repo(REPO)
    fake_hub.fail("create", status)
    result = push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    assert result.commit_oid == fake_hub.last_commit.oid
    assert result.repo_url == f"{fake_hub.endpoint}/{REPO}"
    assert [r.endpoint for r in fake_hub.requests][:2] == ["create", "repo-info"]


@pytest.mark.parametrize("status", [500, 503])
def test_server_error_on_commit(fake_hub, ckpt, caplog, capsys, status):
    fake_hub.fail("commit", status)
    err = _push_failing(fake_hub, ckpt, caplog, capsys)
    assert f"server error {status}" in err.message and "try again later" in err.hint.lower()
    assert fake_hub.endpoint in err.message
    assert not fake_hub.commits


def test_404_repo_not_found(fake_hub, ckpt, caplog, capsys):
    fake_hub.fail("preupload", 404, headers={"X-Error-Code": "RepoNotFound"})
    err = _push_failing(fake_hub, ckpt, caplog, capsys)
    assert "not found" in err.message and REPO in err.message


def test_connection_refused(hub_env, ckpt, caplog, capsys):
    with FakeHub() as hub:
        dead = hub.endpoint
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubError) as info:
        push_checkpoint(ckpt, REPO, endpoint=dead)
    assert f"Cannot reach the Hub at {dead}" in info.value.message
    assert_no_token(str(info.value), caplog.text)


def test_offline_mode_sends_nothing(fake_hub, ckpt, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline"):
        push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


def test_no_token_sends_nothing(fake_hub, ckpt, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError) as info:
        push_checkpoint(ckpt, REPO, endpoint=fake_hub.endpoint)
    assert "hf auth login" in info.value.hint
    assert fake_hub.requests == []


def _not_checkpoints(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (bad_json / "model.safetensors").write_bytes(b"x")
    shard = make_checkpoint(tmp_path / "missing_shard")
    (shard / "model.safetensors").unlink()
    (shard / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    return {
        "missing": (tmp_path / "nope", "does not exist", "qdlm-export quantize"),
        "empty": (empty, "no config.json", "qdlm-export quantize"),
        "no_weights": (no_weights, "no weights", "qdlm-export quantize"),
        "bad_json": (bad_json, "not readable JSON", "qdlm-export quantize"),
        "missing_shard": (shard, "model-00001-of-00002.safetensors", "qdlm-export quantize"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "no_weights", "bad_json", "missing_shard"])
def test_not_a_checkpoint_fails_before_any_request(fake_hub, tmp_path, case):
    folder, what, command = _not_checkpoints(tmp_path)[case]
    with pytest.raises(QdlmError) as info:
        push_checkpoint(folder, REPO, endpoint=fake_hub.endpoint)
    assert not isinstance(info.value, HubError)
    assert what in info.value.message and command in info.value.hint
    assert fake_hub.requests == []


def test_bad_repo_id_fails_before_any_request(fake_hub, ckpt):
    with pytest.raises(QdlmError, match="not a valid Hub repo id"):
        push_checkpoint(ckpt, "a/b/c", endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


# ----------------------------------------------------------------------------------- model card
def test_card_is_deterministic_and_complete(ckpt):
    text = render_model_card(ckpt, REPO)
    assert text == render_model_card(ckpt, REPO)
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "text-generation"
    body = text.split("---\n", 2)[2]
    assert "# LLaDA-8B-Instruct" in body
    for needle in (
        "4-bit",
        "groups of 128",
        "symmetric",
        "16-bit",
        "RTN",
        "0.1.0",
        QUANT_CONFIG["provenance"]["command"],
        "pip install qdlm-export",
        "import qdlm_export",
        f'AutoModel.from_pretrained("{REPO}", trust_remote_code=True',
        "auto_map",
        "13.96 GB",
        "3.71 GB",
        "5.00 GB",
        "16.00 GB",
        "4.25",
        "0.012",
        "docs/FORMAT.md",
    ):
        assert needle in body, needle
    assert "## Quality" in body and "| Task |" not in body  # eval is null


def test_card_without_report_or_remote_code(tmp_path):
    qc = dict(
        QUANT_CONFIG,
        method="gptq",
        activations={"bits": 8, "dynamic": True},
        weights={"bits": 4, "group_size": 64, "symmetric": False},
        provenance={"source": "/models/local-llada"},
    )
    folder = make_checkpoint(tmp_path / "c", quant_config=qc, report=None, auto_map=False)
    text = render_model_card(folder)
    meta = front_matter(text)
    assert "base_model" not in meta and "base_model_relation" not in meta  # local path, not a Hub id
    assert {"gptq", "4-bit", "w4a8"} <= set(meta["tags"])
    assert "AutoModelForCausalLM.from_pretrained" in text and "trust_remote_code" not in text
    assert "asymmetric" in text and "8-bit" in text
    assert "## Size" not in text and "## Quality" not in text
    assert "# local-llada" in text


def test_card_names_come_from_the_report(tmp_path):
    """Display names are data the method class and the family adapter own, recorded in the report by
    `quantize`; the card has no table of its own, and shows the config's keys when the report has none."""
    qc = dict(QUANT_CONFIG, method="gptq")
    calibration = {"dataset": "default", "nsamples": 128, "seqlen": 2048}
    named = dict(REPORT, calibration=calibration, display_names={"method": "GPTQ", "family": "LLaDA"})
    text = render_model_card(make_checkpoint(tmp_path / "named", quant_config=qc, report=named))
    assert "# LLaDA-8B-Instruct — W4A16 GPTQ (qdlm)" in text
    assert "a LLaDA diffusion language model" in text and "Method: GPTQ." in text
    assert "Calibration data: 128 samples of 2048 tokens from the `default` dataset." in text
    assert "needs no calibration data" not in text

    unnamed = {k: v for k, v in named.items() if k != "display_names"}
    text = render_model_card(make_checkpoint(tmp_path / "unnamed", quant_config=qc, report=unnamed))
    assert "# LLaDA-8B-Instruct — W4A16 gptq (qdlm)" in text
    assert "a llada diffusion language model" in text and "Method: gptq." in text


def test_card_says_when_no_calibration_was_used(ckpt, tmp_path):
    assert "RTN needs no calibration data." in render_model_card(ckpt)
    # A method that used none is known from the report's explicit null, not from its name.
    no_report = make_checkpoint(tmp_path / "c", report=None)
    assert "calibration data" not in render_model_card(no_report)


def test_card_eval_table(tmp_path):
    report = dict(REPORT, eval={"gsm8k": {"original": 0.78, "quantized": 0.765}, "note": "n/a"})
    folder = make_checkpoint(tmp_path / "c", report=report)
    text = render_model_card(folder)
    assert "| gsm8k | 0.78 | 0.765 | -0.015 |" in text
    assert "note" not in text.split("## Quality")[1].split("## Format")[0]


def test_write_model_card(ckpt):
    path = write_model_card(ckpt)
    assert path == ckpt / "README.md" and path.read_text() == render_model_card(ckpt)
