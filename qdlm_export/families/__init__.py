"""Model-family adapters: architecture knowledge as data, one module per family."""

from . import diffusion_gemma, llada, llada2_moe, lladamoe, qwen2  # noqa: F401  (registers the families)
from .base import AttentionShape, FamilyAdapter, FusedExperts, LinearGroup, SharedStack
from .registry import family_by_name, family_for_config, known_families, known_model_types, register_family

__all__ = [
    "AttentionShape",
    "FamilyAdapter",
    "FusedExperts",
    "LinearGroup",
    "SharedStack",
    "family_by_name",
    "family_for_config",
    "known_families",
    "known_model_types",
    "register_family",
]
