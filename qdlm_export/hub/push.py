"""Publish a quantized checkpoint folder to the Hugging Face Hub.

:func:`push_checkpoint` validates the folder first with the one checkpoint validation
(:func:`qdlm_export.format.validation.validate_checkpoint`: no staging folder, every promised tensor present
with its dtype and shape, no index entry or symlink leading outside the folder, no truncated file),
so nothing is sent for a folder that is not a complete checkpoint. It then uploads an allow-list:
the weight files the checkpoint loads, its index, and the top-level files a model repo is made of
(configs, tokenizer, remote code, model card, license); pickles (``*.pkl *.pt *.pth *.bin *.ckpt``),
hidden files, sub-folders and stray files are left out and named in a warning. A model card is
rendered for the upload when README.md is missing (or is the untouched card ``quantize`` wrote);
the local README.md is written only after the Hub confirmed the commit, so a failed push leaves
every local file as it was. Every HTTP request has a timeout (``QDLM_HUB_TIMEOUT`` seconds, default
:data:`DEFAULT_TIMEOUT_S`). Every failure becomes a :class:`~qdlm_export.errors.HubError` (or
another ``QdlmError`` for local problems) whose text says what happened and what to do.

The token is never handled as text here: ``token=None`` lets ``huggingface_hub`` find ``HF_TOKEN`` or
the saved login. The token is still known to this module so that it can be scrubbed from any text
that comes back from the server or the HTTP stack before it reaches a message or a log.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import CheckpointError, ConfigError, HubError, QdlmError
from ..format.reader import INDEX_FILE, link_roots, stays_inside
from ..format.validation import ValidCheckpoint, validate_checkpoint
from .card import CARD_FILE, render_model_card

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_ENV = "QDLM_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0  # per HTTP request: connecting, or waiting for the next bytes of an answer
# (huggingface_hub retries its pre-upload and LFS requests up to 5 times after a timeout, with backoff;
# repo creation and the commit itself fail at the first timeout.)
# What a checkpoint repo is made of besides its weights (top-level files only): configs, tokenizer
# files, remote code and the loader copies, model card, license texts, chat templates.
UPLOAD_SUFFIXES = (".json", ".py", ".txt", ".model", ".md", ".jinja", ".tiktoken", ".yaml", ".yml")
UPLOAD_PREFIXES = ("LICENSE", "NOTICE", "COPYING")
# Never uploaded, whatever their name: pickles can run code when loaded.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt")
_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_AUTH_HINT = "Set HF_TOKEN to a token with write access, or run `hf auth login`."


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str
    commit_oid: str
    uploaded: tuple[str, ...] = ()  # paths in the repo
    skipped: tuple[str, ...] = ()  # local entries left out (not part of a checkpoint)


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


def _is_untouched_generated_card(card: Path) -> bool:
    """True when README.md is exactly the card `quantize` wrote (no repo id yet): safe to regenerate."""
    try:
        return card.read_text(encoding="utf-8") == render_model_card(card.parent)
    except (OSError, UnicodeDecodeError, QdlmError):
        return False


def upload_plan(checked: ValidCheckpoint) -> tuple[list[tuple[str, Path]], list[str]]:
    """``([(path in repo, local file)], [left-out entries])``: the allow-list of what ``push`` uploads.

    Uploaded: the weight files the checkpoint loads (its index's shards, or ``model.safetensors``),
    the index, and top-level files with a model-repo suffix (:data:`UPLOAD_SUFFIXES`) or a license
    name. Left out: pickles, hidden files, sub-folders, safetensors the index does not list, anything
    else. Symlinks are only followed inside the folder (the validation refused the others)."""
    folder = checked.folder
    roots = link_roots(folder)
    take: dict[str, Path] = {f.relative_to(folder).as_posix(): f for f in checked.weight_files}
    skipped: list[str] = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name in take:
            continue
        if name.startswith("."):
            if name not in (".git", ".cache"):
                skipped.append(name)
        elif entry.is_dir():
            skipped.append(name + "/")
        elif not entry.is_file() or not stays_inside(entry, roots):
            skipped.append(name)
        elif name == INDEX_FILE:
            take[name] = entry
        elif name.lower().endswith(PICKLE_SUFFIXES) or name.endswith(".safetensors"):
            skipped.append(name)
        elif name.endswith(UPLOAD_SUFFIXES) or name.startswith(UPLOAD_PREFIXES):
            take[name] = entry
        else:
            skipped.append(name)
    return sorted(take.items()), skipped


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
def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    return any(
        c.__name__ == "TimeoutException" and c.__module__.split(".")[0] in ("httpx", "httpx2") for c in type(exc).__mro__
    )


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
    exc: BaseException, *, step: str, endpoint: str, repo_id: str, revision: str | None, scrub: _Scrubber,
    timeout: float | None = None,
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
    if _is_timeout(exc) and timeout is not None:
        return HubError(
            f"The Hub at {endpoint} did not answer within {timeout:g} s {where} ({type(exc).__name__}); the upload "
            "was not confirmed.",
            hint=f"Check the network connection and try again (pushing the same folder again is safe); on a slow "
            f"link, allow more time with {TIMEOUT_ENV}=SECONDS (now {timeout:g}).",
        )
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
    timeout: float | None = None,
) -> PushResult:
    """Upload the checkpoint in ``folder`` to ``repo_id`` and return where the commit landed.

    Validates the folder first (nothing is sent unless it is a complete checkpoint), renders a model
    card if the folder has none (or has the untouched card that ``quantize`` wrote, so that the
    loading example names ``repo_id``), creates the repo if needed (``private=True`` asks for a
    private one; otherwise the namespace's default applies) and the branch ``revision`` if it is
    missing, then uploads the allow-listed files (:func:`upload_plan`) in one commit. ``timeout``:
    seconds each request may wait (default ``QDLM_HUB_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`).
    Local files change only after the Hub confirmed the commit (the rendered card is then saved).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from ..core.arguments import check_bool, check_path

    check_path("push_checkpoint", "folder", folder)
    check_bool("push_checkpoint", "private", private)  # private='no' is truthy
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
        raise HubError(
            f"Cannot reach the Hub at {ep}: offline mode is on (HF_HUB_OFFLINE).",
            hint="Unset HF_HUB_OFFLINE to upload.",
        )
    known = _known_token(token)
    scrub = _Scrubber(known)
    if not known:
        raise HubError(f"No Hugging Face token found, and uploading to {ep} needs one.", hint=_AUTH_HINT)

    files, skipped = upload_plan(checked)
    if skipped:
        logger.warning(
            "Not uploaded (not part of a checkpoint: pickles, hidden files, folders, stray files): %s", ", ".join(skipped)
        )
    qc = config.get("quantization_config")
    is_qdlm = checked.is_qdlm
    card = folder / CARD_FILE
    card_text: str | None = None  # a card rendered for this push, saved locally after success
    if not card.exists() or (is_qdlm and _is_untouched_generated_card(card)):
        if is_qdlm:
            card_text = render_model_card(folder, repo_id)
        else:
            logger.warning("%s has no README.md and no qdlm quantization_config; pushing without a model card.", folder)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files
        if not (card_text is not None and name == CARD_FILE)
    ]
    if card_text is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_text.encode("utf-8")))

    if commit_message is None:
        what = f"{qc.get('method', 'qdlm')} checkpoint" if is_qdlm else "checkpoint"
        version = _tool_version()
        commit_message = f"Upload {what} with qdlm-export" + (f" {version}" if version else "")

    api = HfApi(endpoint=endpoint, token=token, library_name="qdlm-export", library_version=_tool_version())
    step = "creating the repository"
    try:
        with _http_timeout(seconds):
            logger.info("Creating %s on %s (exist_ok)", repo_id, ep)
            repo_url = _create_repo(api, repo_id, private=private, endpoint=ep)
            if revision and revision != "main" and not revision.startswith("refs/"):
                step = f"creating branch {revision!r}"
                logger.info("Creating branch %s in %s (exist_ok)", revision, repo_id)
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            step = "uploading the files"
            logger.info("Uploading %d files of %s to %s%s", len(operations), folder, repo_id,
                        f"@{revision}" if revision else "")
            info = api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message,
                revision=revision,
            )
    except QdlmError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is mapped to one clear HubError
        err = _to_hub_error(e, step=step, endpoint=ep, repo_id=repo_id, revision=revision, scrub=scrub, timeout=seconds)
        # `from None`: the original exception may quote server text; only the scrubbed copy travels.
        raise _scrubbed(err, scrub) from None

    oid = getattr(info, "oid", None)
    commit_url = getattr(info, "commit_url", None)
    if not oid or not commit_url:
        raise HubError(
            f"The Hub at {ep} did not confirm the commit to {repo_id} (no commit id in its answer).",
            hint="Check the repository page before pushing again.",
        )
    if card_text is not None:
        _write_card_after_push(card, card_text)
    logger.info("Pushed %s to %s (commit %s)", folder, repo_id, oid)
    uploaded = tuple(op.path_in_repo for op in operations)
    return PushResult(repo_url=str(repo_url), commit_url=str(commit_url), commit_oid=str(oid),
                      uploaded=uploaded, skipped=tuple(skipped))
