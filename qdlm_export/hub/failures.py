"""How ``push`` reports a failure: Hub and HTTP errors mapped to one clear :class:`HubError`, and the
token scrubbed from every text that comes back from the server or the HTTP stack (it may be quoted
there) before it reaches a message or a log."""

from __future__ import annotations

import re

from ..errors import HubError

TIMEOUT_ENV = "QDLM_HUB_TIMEOUT"
_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
AUTH_HINT = "Set HF_TOKEN to a token with write access, or run `hf auth login`, or pass --token."


# ----------------------------------------------------------------------------------- secrets
class Scrubber:
    def __init__(self, *secrets: str | None):
        self.secrets = sorted({s for s in secrets if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str | None) -> str | None:
        if text is None:
            return None
        for s in self.secrets:
            text = text.replace(s, "***")
        return _TOKEN_SHAPE.sub("hf_***", text)


def known_token(token: str | None) -> str | None:
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


def to_hub_error(
    exc: BaseException, *, step: str, endpoint: str, repo_id: str, revision: str | None, scrub: Scrubber,
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
                hint=AUTH_HINT,
            )
        elif status == 403:
            namespace = repo_id.split("/")[0] if "/" in repo_id else "your account"
            err = HubError(
                f"Permission denied (403 Forbidden) {where} for {repo_id} on {endpoint}: the token cannot "
                f"write to {namespace}.{says}",
                hint=f"Use a token with write access to {namespace}. {AUTH_HINT}",
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
                    hint="Check the repo id and that your token can see it. " + AUTH_HINT,
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


def scrubbed(err: HubError, scrub: Scrubber) -> HubError:
    clean = HubError(scrub(err.message) or "", hint=scrub(err.hint))
    if hasattr(err, "status_code"):
        clean.status_code = err.status_code  # type: ignore[attr-defined]
    return clean
