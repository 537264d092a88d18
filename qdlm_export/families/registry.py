"""Family lookup by ``config.model_type``."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .base import FamilyAdapter

_FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    for model_type in adapter.model_types:
        _FAMILIES[model_type] = adapter
    _FAMILIES.setdefault(f"family:{adapter.name}", adapter)
    return adapter


def family_by_name(name: str) -> FamilyAdapter:
    try:
        return _FAMILIES[f"family:{name}"]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}", hint=f"known families: {', '.join(known_families())}"
        ) from None


def known_families() -> list[str]:
    return sorted(key.split(":", 1)[1] for key in _FAMILIES if key.startswith("family:"))


def known_model_types() -> list[str]:
    return sorted(key for key in _FAMILIES if not key.startswith("family:"))


def family_for_config(config: Any) -> FamilyAdapter:
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    base = base_model_type(config)  # a native checkpoint's qdlm_<type> stands for its source's type
    if base in _FAMILIES:
        return _FAMILIES[base]
    raise UnsupportedModelError(
        f"no model family adapter for model_type {model_type!r}",
        hint=f"supported model types: {', '.join(known_model_types())}. A new family is one file in "
        "qdlm_export/families/ (see docs/ARCHITECTURE.md).",
    )


# A native checkpoint of a family transformers builds by itself is written under a model type of its
# own, ``qdlm_<type>`` (docs/FORMAT.md, loader/native_wrappers.py); its quantization_config keeps the
# source's type, so the checkpoint still maps to its family.
WRAPPED_PREFIX = "qdlm_"
BASE_MODEL_TYPE = "base_model_type"


def wrapped_model_type(base: str) -> str:
    return WRAPPED_PREFIX + base


def base_model_type(config: Any) -> str | None:
    """The model type a wrapped native config (dict or config object) stands for, else None."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict) and hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    base = qc.get(BASE_MODEL_TYPE) if isinstance(qc, dict) else None
    return base if isinstance(base, str) and model_type == wrapped_model_type(base) else None
