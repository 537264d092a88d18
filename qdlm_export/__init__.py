"""qdlm-export: quantize diffusion LLMs into Hub-ready checkpoints that reload with ``from_pretrained``.

Importing the package registers the ``qdlm`` quantization method with transformers.
"""

__version__ = "0.1.0"

from .loader.hf_quantizer import register_with_transformers as _register

_register()

from . import families, methods  # noqa: E402,F401  (register families and methods)
from .loader.native_wrappers import register_wrappers as _register_wrappers  # noqa: E402

_register_wrappers()  # the qdlm_<type> model types of native checkpoints of dense families (docs/FORMAT.md)
