"""Publish a quantized checkpoint folder to the Hugging Face Hub.

:func:`push_checkpoint` checks the folder locally before any request, writes a model card when
README.md is missing (or is the untouched card ``quantize`` wrote), then creates the repo (and branch) and uploads the folder in one call to
``huggingface_hub``. Every failure becomes a :class:`~qdlm_export.errors.HubError` (or another
``QdlmError`` for local problems) whose text says what happened and what to do.

The token is never handled as text here: ``token=None`` lets ``huggingface_hub`` find ``HF_TOKEN`` or
the saved login. The token is still known to this module so that it can be scrubbed from any text
that comes back from the server or the HTTP stack before it reaches a message or a log.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, HubError, QdlmError
from .model_card import CARD_FILE, render_model_card, write_model_card

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# Never worth publishing: caches and editor leftovers. (huggingface_hub already skips .git and .cache.)
IGNORE_PATTERNS = ["__pycache__/*", "**/__pycache__/*", "*.pyc", ".DS_Store", "*.tmp", "*.partial"]
_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_AUTH_HINT = "Set HF_TOKEN to a token with write access, or run `hf auth login`."


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str
    commit_oid: str


# ----------------------------------------------------------------------------------- local checks
def _tool_version() -> str | None:
    try:
        from . import __version__

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("qdlm-export")
    except (ImportError, PackageNotFoundError):
        return None


def _is_untouched_generated_card(card: Path) -> bool:
    """True when README.md is exactly the card `quantize` wrote (no repo id yet): safe to regenerate."""
    try:
        return card.read_text(encoding="utf-8") == render_model_card(card.parent)
    except (OSError, UnicodeDecodeError, QdlmError):
        return False


def _weight_files(folder: Path) -> list[str]:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    return sorted(n for n in names if n.endswith(".safetensors") or re.fullmatch(r"pytorch_model.*\.bin", n))


def check_checkpoint_folder(folder: Path) -> dict[str, Any]:
    """Raise a ``QdlmError`` unless ``folder`` looks like a checkpoint; return its config.json."""
    make = f"Make one with `qdlm-export quantize MODEL --out {folder}`, then push it."
    if not folder.exists():
        raise CheckpointError(f"Checkpoint folder {folder} does not exist.", hint=make)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; push expects a checkpoint folder.", hint=make)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json, so it is not a checkpoint.", hint=make)
    inspect = f"Run `qdlm-export inspect {folder}` to see what is wrong."
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not readable JSON ({e}).", hint=inspect) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} should hold a JSON object.", hint=inspect)

    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"`quantization_config` in {cfg_path} is not an object.", hint=inspect)
    if isinstance(qc, dict) and qc.get("quant_method") == "qdlm":
        missing = [k for k in ("format_version", "weights") if k not in qc]
        if missing:
            raise CheckpointError(
                f"`quantization_config` in {cfg_path} lacks {', '.join(missing)}; the checkpoint is incomplete.",
                hint=inspect,
            )

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index.", hint=inspect) from None
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            raise CheckpointError(
                f"{folder} is missing {len(absent)} weight shard(s) listed in {index.name}: {shown}.",
                hint=f"The export was interrupted or files were moved. {make}",
            )
    elif not _weight_files(folder):
        raise CheckpointError(
            f"{folder} has config.json but no weights (model.safetensors or shards with model.safetensors.index.json).",
            hint=make,
        )
    return config


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise QdlmError(
            f"{repo_id!r} is not a valid Hub repo id ({e}).",
            hint="Use NAMESPACE/NAME, e.g. `my-user/LLaDA-8B-Instruct-qdlm-w4`.",
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or constants.is_offline_mode()


# ----------------------------------------------------------------------------------- secrets
class _Scrubber:
    def __init__(self, *secrets: str | None):
        self.secrets = sorted({s for s in secrets if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str | None) -> str | None:
        if text is None:
            return None
        for s in self.secrets:
            text = text.replace(s, "***")
        return _TOKEN_SHAPE.sub("hf_***", text)


def _known_token(token: str | None) -> str | None:
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - a broken token store is huggingface_hub's error to report later
        return None


# ----------------------------------------------------------------------------------- error mapping
def _is_transport_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return any(
        c.__name__ in ("TransportError", "RequestError") and c.__module__.split(".")[0] in ("httpx", "httpx2")
        for c in type(exc).__mro__
    )


def _server_message(exc: BaseException) -> str | None:
    msg = getattr(exc, "server_message", None)
    if not isinstance(msg, str):
        return None
    lines = list(dict.fromkeys(line.strip() for line in msg.splitlines() if line.strip()))
    return " ".join(lines)[:500] or None


def _to_hub_error(
    exc: BaseException, *, step: str, endpoint: str, repo_id: str, revision: str | None, scrub: _Scrubber
) -> HubError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

    where = f"while {step}"
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(
            f"Cannot reach the Hub at {endpoint} {where}: offline mode is on (HF_HUB_OFFLINE).",
            hint="Unset HF_HUB_OFFLINE to upload.",
        )
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) if isinstance(exc, HfHubHTTPError) else None
    said = _server_message(exc)
    says = f" The Hub says: {scrub(said)}" if said else ""
    if status is not None:
        if status == 401:
            err = HubError(
                f"Authentication failed (401 Unauthorized) {where} for {repo_id} on {endpoint}: the token "
                f"was refused, or it cannot see this repository.{says}",
                hint=_AUTH_HINT,
            )
        elif status == 403:
            namespace = repo_id.split("/")[0] if "/" in repo_id else "your account"
            err = HubError(
                f"Permission denied (403 Forbidden) {where} for {repo_id} on {endpoint}: the token cannot "
                f"write to {namespace}.{says}",
                hint=f"Use a token with write access to {namespace}. {_AUTH_HINT}",
            )
        elif status == 404:
            if isinstance(exc, RevisionNotFoundError) and revision:
                err = HubError(
                    f"Revision {revision!r} was not found in {repo_id} on {endpoint} ({step}).{says}",
                    hint="Check the --revision name; branches are created from main when missing.",
                )
            else:
                err = HubError(
                    f"Repository {repo_id} was not found on {endpoint} ({step}).{says}",
                    hint="Check the repo id and that your token can see it. " + _AUTH_HINT,
                )
        elif status == 429:
            err = HubError(
                f"The Hub at {endpoint} is rate-limiting requests (429) {where}.{says}",
                hint="Wait a few minutes and try again.",
            )
        elif 500 <= status < 600:
            err = HubError(
                f"The Hub at {endpoint} answered with server error {status} {where}; the upload was not "
                f"confirmed.{says}",
                hint="Try again later; pushing the same folder again is safe.",
            )
        else:
            err = HubError(f"The Hub at {endpoint} refused the request {where} (HTTP {status}).{says}")
        err.status_code = status  # type: ignore[attr-defined]
        return err
    if _is_transport_error(exc):
        return HubError(
            f"Cannot reach the Hub at {endpoint} {where} ({type(exc).__name__}: {scrub(str(exc)) or 'no detail'}).",
            hint="Check the network connection, proxy settings and HF_ENDPOINT, then try again.",
        )
    if isinstance(exc, ValueError) and "README.md" in str(exc):
        return HubError(
            f"The Hub rejected the metadata of README.md: {scrub(str(exc))}",
            hint="Fix the YAML header of README.md, or delete README.md to get a generated card.",
        )
    return HubError(f"Upload to {endpoint} failed {where}: {type(exc).__name__}: {scrub(str(exc))}")


def _scrubbed(err: HubError, scrub: _Scrubber) -> HubError:
    clean = HubError(scrub(err.message) or "", hint=scrub(err.hint))
    if hasattr(err, "status_code"):
        clean.status_code = err.status_code  # type: ignore[attr-defined]
    return clean


def _create_repo(api, repo_id: str, *, private: bool, endpoint: str) -> str:
    """``create_repo(exist_ok=True)``; ``private=False`` leaves visibility to the namespace default."""
    from huggingface_hub import errors

    uri_error = getattr(errors, "HfUriError", None)
    try:
        return str(api.create_repo(repo_id, private=True if private else None, exist_ok=True))
    except Exception as e:
        # huggingface_hub 2.4: when creation is refused (401/403) but the repo exists, it builds the
        # repo URL without its endpoint and fails to parse it for any host but huggingface.co. The
        # repo was found at that point, so carry on.
        if uri_error is not None and isinstance(e, uri_error):
            logger.debug("create_repo could not parse the URL of existing repo %s; using the endpoint", repo_id)
            return f"{endpoint}/{repo_id}"
        raise


# ----------------------------------------------------------------------------------- push
def push_checkpoint(
    folder: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Upload the checkpoint in ``folder`` to ``repo_id`` and return where the commit landed.

    Checks the folder first (nothing is sent if it is not a checkpoint), writes README.md with
    :func:`~qdlm_export.model_card.write_model_card` if the folder has none (or has the untouched card
    that ``quantize`` wrote, so that the loading example names ``repo_id``), creates the repo if
    needed (``private=True`` asks for a private one; otherwise the namespace's default applies) and
    the branch ``revision`` if it is missing, then uploads every file in one commit.
    """
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    config = check_checkpoint_folder(folder)
    _check_repo_id(repo_id)
    ep = (endpoint or constants.ENDPOINT or DEFAULT_ENDPOINT).rstrip("/")
    if _offline():
        raise HubError(
            f"Cannot reach the Hub at {ep}: offline mode is on (HF_HUB_OFFLINE).",
            hint="Unset HF_HUB_OFFLINE to upload.",
        )
    known = _known_token(token)
    scrub = _Scrubber(known)
    if not known:
        raise HubError(f"No Hugging Face token found, and uploading to {ep} needs one.", hint=_AUTH_HINT)

    qc = config.get("quantization_config")
    is_qdlm = isinstance(qc, dict) and qc.get("quant_method") == "qdlm"
    card = folder / CARD_FILE
    if not card.exists() or (is_qdlm and _is_untouched_generated_card(card)):
        if is_qdlm:
            try:
                path = write_model_card(folder, repo_id)
            except OSError as e:
                raise CheckpointError(
                    f"Cannot write {folder / CARD_FILE} ({e}).",
                    hint="Make the folder writable or add a README.md yourself.",
                ) from None
            logger.info("Wrote model card %s", path)
        else:
            logger.warning("%s has no README.md and no qdlm quantization_config; pushing without a model card.", folder)

    if commit_message is None:
        what = f"{qc.get('method', 'qdlm')} checkpoint" if is_qdlm else "checkpoint"
        version = _tool_version()
        commit_message = f"Upload {what} with qdlm-export" + (f" {version}" if version else "")

    api = HfApi(endpoint=endpoint, token=token, library_name="qdlm-export", library_version=_tool_version())
    step = "creating the repository"
    try:
        logger.info("Creating %s on %s (exist_ok)", repo_id, ep)
        repo_url = _create_repo(api, repo_id, private=private, endpoint=ep)
        if revision and revision != "main" and not revision.startswith("refs/"):
            step = f"creating branch {revision!r}"
            logger.info("Creating branch %s in %s (exist_ok)", revision, repo_id)
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading the files"
        logger.info("Uploading %s to %s%s", folder, repo_id, f"@{revision}" if revision else "")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except QdlmError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is mapped to one clear HubError
        err = _to_hub_error(e, step=step, endpoint=ep, repo_id=repo_id, revision=revision, scrub=scrub)
        # `from None`: the original exception may quote server text; only the scrubbed copy travels.
        raise _scrubbed(err, scrub) from None

    oid = getattr(info, "oid", None)
    commit_url = getattr(info, "commit_url", None)
    if not oid or not commit_url:
        raise HubError(
            f"The Hub at {ep} did not confirm the commit to {repo_id} (no commit id in its answer).",
            hint="Check the repository page before pushing again.",
        )
    logger.info("Pushed %s to %s (commit %s)", folder, repo_id, oid)
    return PushResult(repo_url=str(repo_url), commit_url=str(commit_url), commit_oid=str(oid))
