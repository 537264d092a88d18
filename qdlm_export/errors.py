"""One exception family for everything a user can cause.

Errors are raised where the fact is known (scheme validation, adapter lookup, file checks) with a
message written for the user: what is wrong, where, and what to do next. The CLI turns any
``QdlmError`` into a clean message and a non-zero exit code through one table in ``cli.py``.
"""

from __future__ import annotations


class QdlmError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class ConfigError(QdlmError):
    """An invalid quantization scheme or option (bits, group size, method name...)."""

    exit_code = 2


class ModelNotFoundError(QdlmError):
    """The model path or Hub id cannot be found or read."""


class UnsupportedModelError(QdlmError):
    """No family adapter matches the model, or the model needs remote code that was not allowed."""


class OutputExistsError(QdlmError):
    """The output folder exists and ``--overwrite`` was not given."""


class CheckpointError(QdlmError):
    """A quantized checkpoint is missing a tensor, has a wrong dtype/shape, or a bad config."""


class InputDataError(QdlmError):
    """Input data the tool cannot use: a corrupted or truncated source file, a config.json that does
    not match the weights, NaN/Inf in a source tensor, a calibration file that is not UTF-8 text."""


class ArgumentTypeError(ConfigError, TypeError):
    """A Python API argument of the wrong type (a string where a bool belongs, ...)."""


class HubError(QdlmError):
    """An upload to the Hugging Face Hub failed (authentication, permissions, server)."""


def json_kind(value: object) -> str:
    """The JSON name of a parsed value's type ("object", "array", "string", ...), for messages that
    say what a file holds instead of what was expected."""
    kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"), (dict, "object"),
             (type(None), "null"))
    return next((name for cls, name in kinds if isinstance(value, cls)), type(value).__name__)
