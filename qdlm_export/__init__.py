"""qdlm-export: quantize diffusion LLMs into Hub-ready checkpoints that reload with ``from_pretrained``.

Importing the package registers the ``qdlm`` quantization method with transformers.
"""


def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written); in a
    source tree without package metadata, read from that pyproject.toml."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qdlm-export")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE) \
            if pyproject.is_file() else None
        return found.group(1) if found else "0+unknown"


__version__ = _version()

from .loader.hf_quantizer import register_with_transformers as _register

_register()

from . import families, methods  # noqa: E402,F401  (register families and methods)
from .loader import grouped_experts as _grouped_experts  # noqa: E402,F401  (the grouped mixture-of-experts path after loading)
from .loader.native_wrappers import register_wrappers as _register_wrappers  # noqa: E402

_register_wrappers()  # the qdlm_<type> model types of native checkpoints of dense families (docs/FORMAT.md)
