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
    from ..loader.native_wrappers import base_model_type

    base = base_model_type(config)  # a native checkpoint's qdlm_<type> stands for its source's type
    if base in _FAMILIES:
        return _FAMILIES[base]
    raise UnsupportedModelError(
        f"no model family adapter for model_type {model_type!r}",
        hint=f"supported model types: {', '.join(known_model_types())}. A new family is one file in "
        "qdlm_export/families/ (see docs/ARCHITECTURE.md).",
    )
