"""Reading a checkpoint from the Hub: a Hub id becomes a local folder of huggingface_hub's cache
(``snapshot_download``), so every command that reads a checkpoint (inspect, eval, convert, bench)
takes ``owner/name`` as well as a folder. Only what a checkpoint needs is downloaded, and never a
pickle (``*.bin``, ``*.pt``, ``*.pkl``): loading one can run code."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, HubError, ModelNotFoundError
from ..format.report import looks_like_hub_id
from .failures import AUTH_HINT, Scrubber, known_token

# What a checkpoint folder holds (docs/FORMAT.md): config, safetensors weights and their index, the
# tokenizer, remote modeling code, and our report, card and recipe.
CHECKPOINT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "*.py",
    "qdlm_report.json",
    "README.md",
    "qdlm_recipe.yaml",
]


def names_hub_repo(name_or_path: str | Path) -> bool:
    """True when ``name_or_path`` is read from the Hub: ``owner/name`` with no local folder of that name."""
    text = str(name_or_path)
    return looks_like_hub_id(text) and not Path(text).expanduser().exists()


def local_checkpoint(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """A local folder for ``name_or_path``: an existing path (or anything that is not a Hub id) as
    given, so the command's own missing-folder error stays; a Hub id downloaded into (or, offline,
    found in) huggingface_hub's cache at ``revision``."""
    text = str(name_or_path)
    if not names_hub_repo(text):
        if revision is not None:
            raise ConfigError(
                f"--revision {revision} applies to Hub ids, and {text} is a local path",
                hint="drop --revision, or pass the checkpoint's Hub id (owner/name)",
            )
        return Path(text).expanduser()
    from huggingface_hub import constants, snapshot_download

    endpoint = constants.ENDPOINT
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one of ours, below
        raise _download_error(exc, text, revision, endpoint, offline=constants.HF_HUB_OFFLINE) from None


def _offline(flag: bool) -> bool:
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download_error(exc: BaseException, repo_id: str, revision: str | None, endpoint: str, *, offline: bool):
    """``exc`` from ``snapshot_download`` as a ``ModelNotFoundError`` or ``HubError`` with a hint; the
    token never appears (server messages may quote it)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    scrub = Scrubber(known_token(None))
    at = f" at revision {revision!r}" if revision else ""
    if _offline(offline) and isinstance(exc, (LocalEntryNotFoundError, IncompleteSnapshotError)):
        return ModelNotFoundError(
            f"{repo_id}{at} is not in the local Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE)",
            hint="unset HF_HUB_OFFLINE to download it, or pass a local checkpoint folder",
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFoundError(
            f"revision {revision!r} was not found in {repo_id} on {endpoint}",
            hint="check the --revision name (a branch, tag or commit of the repository)",
        )
    if isinstance(exc, GatedRepoError):
        return ModelNotFoundError(
            f"{repo_id} on {endpoint} is gated: its terms must be accepted before downloading",
            hint=f"accept them on the repository's page, then use a token of that account. {AUTH_HINT}",
        )
    status = getattr(getattr(exc, "response", None), "status_code", None) if isinstance(exc, HfHubHTTPError) else None
    if isinstance(exc, RepositoryNotFoundError) or status in (401, 404):
        return ModelNotFoundError(
            f"{repo_id} is neither a local folder nor a repository your token can see on {endpoint}",
            hint="check the path or the Hub id (owner/name); for a private repository, " + AUTH_HINT[0].lower()
            + AUTH_HINT[1:],
        )
    if isinstance(exc, IncompleteSnapshotError):
        return HubError(
            f"the cached copy of {repo_id}{at} is incomplete and the Hub at {endpoint} could not be reached",
            hint="check the network connection and try again; the download resumes",
        )
    detail = scrub(str(exc).splitlines()[0] if str(exc) else "") or "no detail"
    if status is not None:
        return HubError(f"the Hub at {endpoint} answered HTTP {status} while downloading {repo_id}: {detail}",
                        hint="try again later")
    return HubError(
        f"could not download {repo_id}{at} from {endpoint} ({type(exc).__name__}: {detail})",
        hint="check the network connection, proxy settings and HF_ENDPOINT; HF_HUB_OFFLINE=1 uses the local cache",
    )
