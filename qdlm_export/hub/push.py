"""Publish a quantized checkpoint folder to the Hugging Face Hub.

:func:`push_checkpoint` validates the folder first with the one checkpoint validation
(:func:`qdlm_export.format.validation.validate_checkpoint`: no staging folder, every promised tensor present
with its dtype and shape, no index entry or symlink leading outside the folder, no truncated file),
so nothing is sent for a folder that is not a complete checkpoint. It then uploads an allow-list
(hub/upload_plan.py): the weight files the checkpoint loads, its index, and the top-level files a
model repo is made of (configs, tokenizer, remote code, model card, license); pickles, hidden files,
sub-folders and stray files are left out and named in a warning. Like ``hf upload``: ``include`` /
``exclude`` globs narrow it, ``delete`` globs remove repo files in the same commit, weight files on
the Hub that the upload does not replace are deleted by default (a re-push that went from one file
to shards leaves no stale ``model.safetensors``), ``create_pr`` opens a pull request, and folders
over :data:`LARGE_FOLDER_BYTES` go through huggingface_hub's resumable upload. A model card is
rendered for the upload when README.md is missing or is the generated card; the local README.md is
written only after the Hub confirmed the commit, so a failed push leaves every local file as it was.
Every HTTP request has a timeout (``QDLM_HUB_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_S`).
Every failure becomes a :class:`~qdlm_export.errors.HubError` (hub/failures.py; or another
``QdlmError`` for local problems) whose text says what happened and what to do.

``token=None`` lets ``huggingface_hub`` find ``HF_TOKEN`` or the saved login; a given token is only
handed to ``HfApi``. Either way it is scrubbed from any text that comes back from the server or the
HTTP stack before it reaches a message or a log.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import CheckpointError, ConfigError, HubError, QdlmError
from ..format.validation import validate_checkpoint
from .card import CARD_FILE, is_generated_card, regenerated_inputs, render_model_card
from .failures import AUTH_HINT, TIMEOUT_ENV, Scrubber, known_token, scrubbed, to_hub_error
from .upload_plan import filter_plan, stale_files, upload_plan

__all__ = ["DEFAULT_TIMEOUT_S", "LARGE_FOLDER_BYTES", "PushResult", "hub_timeout", "push_checkpoint", "upload_plan",
           "validate_checkpoint"]

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT_S = 60.0  # per HTTP request: connecting, or waiting for the next bytes of an answer
# (huggingface_hub retries its pre-upload and LFS requests up to 5 times after a timeout, with backoff;
# repo creation and the commit itself fail at the first timeout.)
# Above this many bytes of files to upload, `large_folder=None` goes through huggingface_hub's
# resumable upload_large_folder (several commits, resumable after an interruption); below, one commit.
LARGE_FOLDER_BYTES = 5_000_000_000  # 5 GB, decimal as the Hub counts


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str
    commit_oid: str
    uploaded: tuple[str, ...] = ()  # paths in the repo
    skipped: tuple[str, ...] = ()  # local entries left out (not part of a checkpoint, or --include/--exclude)
    deleted: tuple[str, ...] = ()  # files removed from the repo (stale weights, --delete)
    pr_url: str | None = None  # with create_pr: the pull request opened


# ----------------------------------------------------------------------------------- local checks
def _tool_version() -> str | None:
    try:
        from .. import __version__

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("qdlm-export")
    except (ImportError, PackageNotFoundError):
        return None


def hub_timeout(value: float | str | None = None) -> float:
    """Seconds each Hub request may wait: ``value``, else ``QDLM_HUB_TIMEOUT``, else the default."""
    source = "timeout" if value is not None else TIMEOUT_ENV
    raw = value if value is not None else os.environ.get(TIMEOUT_ENV, "").strip()
    if raw in ("", None):
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"{source}={raw!r} is not a positive number of seconds",
            hint=f"set {TIMEOUT_ENV} to a number of seconds such as 120, or unset it (default {DEFAULT_TIMEOUT_S:g} s)",
        )
    return seconds


@contextmanager
def _http_timeout(seconds: float) -> Iterator[None]:
    """Every request ``huggingface_hub`` makes in this block gives up after ``seconds`` without progress.

    huggingface_hub shares one HTTP client, built by a factory, and builds it with no timeout; the
    factory in force (the default, or the user's) is wrapped to set one and restored afterwards."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory

    def factory():
        client = previous()
        client.timeout = seconds
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def _write_card_after_push(card: Path, text: str) -> None:
    """Store the uploaded card locally too (atomically); a failure here does not undo the push. A
    README.md that is a link (a Hub cache snapshot) is left alone."""
    if card.is_symlink():
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{card.name}.", suffix=".tmp", dir=card.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, card)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        logger.warning("Pushed, but could not write the model card to %s (%s).", card, e.strerror or e)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
def _card_for_push(folder: Path, repo_id: str, license: str | None, base_model: str | None) -> str | None:
    """The card to upload in place of README.md: rendered when there is none, or when it is the
    generated card (keeping the license and base model it shows unless new ones are given); None for
    a hand-edited card, which is uploaded as it is."""
    card = folder / CARD_FILE
    if card.exists() and not is_generated_card(folder):
        if license is not None or base_model is not None:
            logger.warning("%s was edited by hand: it is uploaded as it is, without the --license/--base-model "
                           "given (delete it to get a generated card).", card)
        return None
    kept = regenerated_inputs(folder) if card.exists() else None
    return render_model_card(
        folder, repo_id,
        license=license if license is not None else (kept.license if kept else None),
        base_model=base_model if base_model is not None else (kept.base_model if kept else None),
    )


def _commit_message(qc: dict, is_qdlm: bool) -> str:
    what = f"{qc.get('method', 'qdlm')} checkpoint" if is_qdlm else "checkpoint"
    version = _tool_version()
    return f"Upload {what} with qdlm-export" + (f" {version}" if version else "")


def push_checkpoint(
    folder: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
    create_pr: bool = False,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
    delete: list[str] | tuple[str, ...] = (),
    delete_stale: bool = True,
    large_folder: bool | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> PushResult:
    """Upload the checkpoint in ``folder`` to ``repo_id`` and return where the commit landed.

    Validates the folder first (nothing is sent unless it is a complete checkpoint), renders a model
    card if the folder has none (or has the generated card, so that the loading example names
    ``repo_id``; ``license``/``base_model`` replace what it shows), creates the repo if needed
    (``private=True`` asks for a private one) and the branch ``revision`` if it is missing, then
    uploads the allow-listed files (:func:`upload_plan`), narrowed by the ``include``/``exclude``
    globs, in one commit that also deletes the repo's files matching ``delete`` and (``delete_stale``)
    the weight files the upload does not replace. ``create_pr`` opens a pull request instead of
    committing to the branch. ``large_folder``: upload through ``upload_large_folder`` (resumable,
    several commits, no pull request); ``None`` does so above :data:`LARGE_FOLDER_BYTES` unless
    ``create_pr``. ``token``: used for the requests, never shown (``None``: HF_TOKEN or the saved
    login). ``timeout``: seconds each request may wait (default ``QDLM_HUB_TIMEOUT``, else
    :data:`DEFAULT_TIMEOUT_S`). Local files change only after the Hub confirmed the commit.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    from ..core.arguments import check_bool, check_path

    check_path("push_checkpoint", "folder", folder)
    for name, value in (("private", private), ("create_pr", create_pr), ("delete_stale", delete_stale)):
        check_bool("push_checkpoint", name, value)  # private='no' is truthy
    if large_folder and create_pr:
        raise ConfigError(
            "a pull request cannot be opened with the large-folder upload (huggingface_hub's upload_large_folder "
            "commits to a branch, in several commits)",
            hint="leave out --large-folder to open the pull request in one commit, or push to a branch with --revision",
        )
    folder = Path(folder)
    checked = validate_checkpoint(folder, require_qdlm=False)
    config = checked.config
    if not isinstance(config.get("quantization_config"), dict):
        # push publishes quantized checkpoints (native or converted); a full-precision folder here is
        # almost always the wrong argument (the source model instead of the output)
        raise CheckpointError(
            f"{folder} is not a quantized checkpoint: its config.json has no quantization_config",
            hint="push the folder `qdlm-export quantize --out` (or `convert --out`) wrote; to upload any other "
            "folder use `hf upload`",
        )
    _check_repo_id(repo_id)
    seconds = hub_timeout(timeout)
    ep = (endpoint or constants.ENDPOINT or DEFAULT_ENDPOINT).rstrip("/")
    if _offline():
        raise HubError(f"Cannot reach the Hub at {ep}: offline mode is on (HF_HUB_OFFLINE).",
                       hint="Unset HF_HUB_OFFLINE to upload.")
    known = known_token(token)
    scrub = Scrubber(known)
    if not known:
        raise HubError(f"No Hugging Face token found, and uploading to {ep} needs one.", hint=AUTH_HINT)

    files, skipped = upload_plan(checked)
    if skipped:
        logger.warning(
            "Not uploaded (not part of a checkpoint: pickles, hidden files, folders, stray files): %s", ", ".join(skipped)
        )
    files, filtered = filter_plan(files, list(include), list(exclude))
    if filtered:
        logger.info("Left out by --include/--exclude: %s", ", ".join(filtered))
    card_wanted = not ((include and not any(n == CARD_FILE for n, _ in files)) or CARD_FILE in filtered)
    if not files and not card_wanted:
        raise ConfigError(f"--include/--exclude leave nothing of {folder} to upload",
                          hint="check the patterns against the file names `qdlm-export inspect` lists")
    card_text = None
    if card_wanted:
        if checked.is_qdlm:
            card_text = _card_for_push(folder, repo_id, license, base_model)
        elif not (folder / CARD_FILE).exists():
            logger.warning("%s has no README.md and no qdlm quantization_config; pushing without a model card.", folder)
    adds = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files
            if not (card_text is not None and name == CARD_FILE)]
    if card_text is not None:
        adds.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_text.encode("utf-8")))
    uploading = {op.path_in_repo for op in adds}
    total = sum(path.stat().st_size for _, path in files)
    large = large_folder if large_folder is not None else (total > LARGE_FOLDER_BYTES and not create_pr)
    if commit_message is None:
        commit_message = _commit_message(config["quantization_config"], checked.is_qdlm)

    api = HfApi(endpoint=endpoint, token=token, library_name="qdlm-export", library_version=_tool_version())
    step = "creating the repository"
    info, deletes = None, []
    try:
        with _http_timeout(seconds):
            logger.info("Creating %s on %s (exist_ok)", repo_id, ep)
            repo_url = _create_repo(api, repo_id, private=private, endpoint=ep)
            if revision and revision != "main" and not revision.startswith("refs/"):
                step = f"creating branch {revision!r}"
                logger.info("Creating branch %s in %s (exist_ok)", revision, repo_id)
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            if delete or delete_stale:
                step = "listing the files already in the repository"
                remote = api.list_repo_files(repo_id, revision=revision)
                deletes = stale_files(remote, uploading, list(delete), weights=delete_stale)
                if deletes:
                    logger.info("Deleting from %s: %s", repo_id, ", ".join(deletes))
            operations = adds + [CommitOperationDelete(path_in_repo=p) for p in deletes]
            if large:
                step = "uploading the files (large-folder upload)"
                logger.info("Uploading %d files (%d bytes) of %s to %s with upload_large_folder", len(files), total,
                            folder, repo_id)
                allow = sorted(n for n, _ in files if not (n == CARD_FILE and card_text is not None))
                _upload_large(api, repo_id, folder, revision=revision, private=private, allow=allow,
                              commit_message=commit_message)
                # then one commit of what it cannot do: the rendered card, and the deletions
                operations = [op for op in operations if isinstance(op, CommitOperationDelete)
                              or (op.path_in_repo == CARD_FILE and card_text is not None)]
            step = "uploading the files"
            if operations:
                logger.info("Committing %d files and %d deletions to %s%s%s", len(operations) - len(deletes),
                            len(deletes), repo_id, f"@{revision}" if revision else "", " as a pull request" * create_pr)
                info = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                                         revision=revision, create_pr=create_pr)
            else:
                head = api.repo_info(repo_id, revision=revision).sha
                info = _HeadCommit(oid=head, commit_url=f"{ep}/{repo_id}/commit/{head}")
    except QdlmError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is mapped to one clear HubError
        err = to_hub_error(e, step=step, endpoint=ep, repo_id=repo_id, revision=revision, scrub=scrub, timeout=seconds)
        # `from None`: the original exception may quote server text; only the scrubbed copy travels.
        raise scrubbed(err, scrub) from None

    oid = getattr(info, "oid", None)
    commit_url = getattr(info, "commit_url", None)
    if not oid or not commit_url:
        raise HubError(
            f"The Hub at {ep} did not confirm the commit to {repo_id} (no commit id in its answer).",
            hint="Check the repository page before pushing again.",
        )
    if card_text is not None and not create_pr:  # a PR may never be merged: the local card stays as it was
        _write_card_after_push(folder / CARD_FILE, card_text)
    pr_url = getattr(info, "pr_url", None)
    logger.info("Pushed %s to %s (commit %s)%s", folder, repo_id, oid, f", pull request {pr_url}" if pr_url else "")
    return PushResult(repo_url=str(repo_url), commit_url=str(commit_url), commit_oid=str(oid),
                      uploaded=tuple(sorted(uploading)), skipped=tuple(skipped + filtered), deleted=tuple(deletes),
                      pr_url=str(pr_url) if pr_url else None)


def _upload_large(api, repo_id: str, folder: Path, *, revision: str | None, private: bool, allow: list[str],
                  commit_message: str) -> None:
    """The resumable upload of many large files: ``upload_large_folder`` where huggingface_hub has it;
    in 2.x, where it is gone, ``upload_folder`` is the resumable one (batched commits with hf_xet)."""
    large = getattr(api, "upload_large_folder", None)
    if large is not None:
        large(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
              private=True if private else None, allow_patterns=allow, print_report=False)
    else:
        api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, allow_patterns=allow,
                          commit_message=commit_message)


@dataclass(frozen=True)
class _HeadCommit:
    """Where a large-folder upload left the branch, when no final commit was needed."""

    oid: str
    commit_url: str
