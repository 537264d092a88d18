"""Before any heavy work: the source model's own code is repaired where known to be needed
(families/compat.py), built, and its first block run on a small input.

If the model's code cannot run with the installed transformers, the run stops here with an
:class:`UnsupportedModelError` that names the model file and line, the failure, the installed
transformers version and what to do — not after an hour of quantization, and never as "a bug in
qdlm-export". A source whose float outputs are not finite stops here too: quantizing it would only
hide the damage in the reported error.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..families import compat

_DYNAMIC_PACKAGE = "transformers_modules"


def _is_remote_module(name: str) -> bool:
    return name.split(".")[0] == _DYNAMIC_PACKAGE


def prepare_config(source, config: Any) -> None:
    """Repair the config class's module (and this already-built instance) in memory."""
    module = sys.modules.get(type(config).__module__)
    if module is not None and _is_remote_module(module.__name__):
        compat.repair_module(module)
    compat.repair_config(config, source.config_dict)


def _class_reference(source) -> str | None:
    auto_map = source.config_dict.get("auto_map") or {}
    ref = auto_map.get(source.adapter.auto_class)
    if ref is None:
        ref = next((v for k, v in auto_map.items() if k.startswith("AutoModel")), None)
    if isinstance(ref, (list, tuple)):
        ref = ref[0]
    return ref if isinstance(ref, str) else None


def prepare_model_code(source) -> None:
    """Import the model's remote code and repair its classes before anything builds them."""
    if not (source.trust_remote_code and source.config_dict.get("auto_map")):
        return
    ref = _class_reference(source)
    if ref is None:
        return
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        cls = get_class_from_dynamic_module(ref, str(source.path))
    except Exception as exc:
        raise remote_code_error(source, exc, f"importing {ref}") from None
    module = sys.modules.get(cls.__module__)
    if module is not None:
        compat.repair_module(module)


def _model_frame(exc: BaseException, source) -> traceback.FrameSummary | None:
    """The innermost traceback frame in the model's own code (its folder or transformers' copy)."""
    found = None
    folder = str(Path(source.path).resolve())
    for frame in traceback.extract_tb(exc.__traceback__):
        name = frame.filename
        if f"{_DYNAMIC_PACKAGE}" in Path(name).parts or name.startswith(folder):
            found = frame
    return found


def remote_code_error(source, exc: BaseException, stage: str,
                      other_code: str = "a revision of the model whose code supports transformers 5 (--revision)",
                      ) -> UnsupportedModelError:
    """What to tell the user when the model's own code fails under the installed transformers.
    ``other_code``: how, in the command at hand, to point at a model whose code works."""
    import transformers

    frame = _model_frame(exc, source)
    where = (f"{Path(frame.filename).name}, line {frame.lineno}, in {frame.name}: `{(frame.line or '').strip()}`"
             if frame else "its modeling code")
    files = ", ".join(sorted(p.name for p in Path(source.path).glob("*.py"))) or "its remote code"
    written = (source.config_dict or {}).get("transformers_version")
    written = f" (its config.json was saved with transformers {written})" if isinstance(written, str) else ""
    return UnsupportedModelError(
        f"{source.model_id}: the model's own code ({where}) fails under the installed transformers "
        f"{transformers.__version__} while {stage}: {type(exc).__name__}: {exc}",
        hint=(
            f"this is an incompatibility between the model's remote code ({files}) and transformers "
            f"{transformers.__version__}, not a problem with the weights; qdlm-export repairs the known ones of the "
            f"published LLaDA and Dream code automatically, and this one is not among them. Use {other_code}, or a "
            "local copy of the model folder with the code fixed; the model card names the transformers version its "
            f"code was written for{written}"
        ),
    )


class _StopAfterBlock(Exception):
    def __init__(self, output):
        super().__init__("stop")
        self.output = output


@torch.no_grad()
def run_first_block(source, device: torch.device | str = "cpu", seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Build the source model, load its embeddings and first block, and run them on ``seq_len``
    random tokens through the model's own forward. Returns block 0's output.

    Raises :class:`UnsupportedModelError` when the model's code cannot build or run, or when the
    output is not finite.
    """
    device = torch.device(device)
    model = source.skeleton()  # repairs applied, construction errors explained (source.py)
    adapter = source.adapter
    vocab = int(source.config_dict.get("vocab_size") or source.config_dict.get("embedding_size") or 2)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(vocab, 1), (1, seq_len), generator=gen).to(device)
    try:
        for prefix in source.non_block_prefixes(model):
            source.materialize(model, prefix, device, torch.float32)
        source.materialize(model, adapter.block_prefix(0), device, torch.float32)
        block = adapter.block_list(model)[0]

        def stop(module, args, output):
            raise _StopAfterBlock(output)

        handle = block.register_forward_hook(stop)
        try:
            model(input_ids=ids)
            raise UnsupportedModelError(
                f"{source.model_id}: the model's forward never ran its first block ({adapter.block_prefix(0)})",
                hint="the model's code does not match the family qdlm-export detected from config.json",
            )
        except _StopAfterBlock as stopped:
            output = stopped.output
        except UnsupportedModelError:
            raise
        except Exception as exc:
            raise remote_code_error(source, exc, "running its first block on a small input") from None
        finally:
            handle.remove()
    finally:
        del model
        from .source import return_freed_memory

        return_freed_memory()
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not torch.is_tensor(hidden):
        return hidden
    bad = int((~torch.isfinite(hidden)).sum())
    if bad:
        raise UnsupportedModelError(
            f"{source.model_id}: the float model's first block ({adapter.block_prefix(0)}) gives {bad} non-finite "
            f"values out of {hidden.numel()} on a small random input",
            hint="the source weights or the model's code produce NaN/Inf before any quantization; check that the "
            "model loads and runs with transformers on its own (from_pretrained and a forward pass)",
        )
    return hidden


def check_finite_logits(source, logits: torch.Tensor, what: str) -> None:
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise UnsupportedModelError(
            f"{source.model_id}: the float model's logits ({what}) have {bad} non-finite values out of {logits.numel()}",
            hint="the source weights or the model's code produce NaN/Inf without any quantization; check that the "
            "model loads and runs with transformers on its own",
        )
