"""A source model on disk, read lazily: config, family adapter, and tensors memory-mapped from its
safetensors, materialised into a weightless skeleton one block at a time.

This is what keeps peak memory near one block: the skeleton's parameters live on the ``meta``
device until a block is needed, and go back there once it has been written.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from .errors import ModelNotFoundError, UnsupportedModelError
from .families import FamilyAdapter, family_for_config

# Files that hold weights (never copied as-is into a quantized checkpoint) or that we rewrite.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", ".gitattributes",
              "config.json", "qdlm_report.json"}


def resolve_model_path(model: str, *, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub id downloaded (config, code, tokenizer, safetensors)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model path {model} is a file", hint="pass the model's folder, not a file in it")
        return path
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1 or os.sep in model.split("/", 1)[1]
    if looks_local:
        raise ModelNotFoundError(
            f"model path {model} does not exist",
            hint="pass an existing local folder (with config.json) or a Hub id such as GSAI-ML/LLaDA-8B-Instruct",
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model,
            revision=revision,
            allow_patterns=["*.json", "*.py", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"],
        )
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise ModelNotFoundError(
            f"could not download {model} from the Hub ({type(exc).__name__})",
            hint="check the id and your connection (HF_HUB_OFFLINE must be unset), or pass a local folder",
        ) from None
    return Path(local)


def read_config_dict(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} has no config.json", hint="pass a Hugging Face model folder")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"{config_file} is not valid JSON: {exc}") from None


def needs_remote_code(config: dict[str, Any]) -> bool:
    from transformers import CONFIG_MAPPING

    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


@dataclass
class SourceModel:
    path: Path
    config_dict: dict[str, Any]
    adapter: FamilyAdapter
    trust_remote_code: bool
    model_id: str  # what the user passed: a Hub id or a path
    _key_to_file: dict[str, Path] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)
    _handles: dict[Path, Any] = field(default_factory=dict)
    _config: Any = None

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, model: str, *, trust_remote_code: bool = False, revision: str | None = None) -> "SourceModel":
        path = resolve_model_path(model, revision=revision)
        config = read_config_dict(path)
        if config.get("quantization_config"):
            method = config["quantization_config"].get("quant_method", "?")
            raise UnsupportedModelError(
                f"{model} is already quantized (quant_method {method!r})",
                hint="quantize the original full-precision model instead",
            )
        adapter = family_for_config(config)
        if needs_remote_code(config) and not trust_remote_code:
            files = ", ".join(sorted(p.name for p in path.glob("*.py"))) or "its auto_map classes"
            raise UnsupportedModelError(
                f"{model} (model_type {config.get('model_type')!r}) runs its own modeling code ({files})",
                hint="review that code, then re-run with --trust-remote-code to allow it",
            )
        source = cls(path=path, config_dict=config, adapter=adapter, trust_remote_code=trust_remote_code, model_id=model)
        source._index_tensors()
        return source

    def _index_tensors(self) -> None:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            raise ModelNotFoundError(
                f"{self.path} has no .safetensors weights" + (f" (found {', '.join(pickles)})" if pickles else ""),
                hint="qdlm-export reads safetensors only, never pickled weights; convert the checkpoint to "
                "safetensors first (e.g. save_pretrained(..., safe_serialization=True))",
            )
        for f in files:
            with safe_open(f, "pt") as handle:
                for key in handle.keys():
                    self._key_to_file[key] = f

    # ---- tensors -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, "pt"))
        return self._handles[file]

    def has(self, key: str) -> bool:
        return key in self._key_to_file

    def tensor(self, key: str) -> torch.Tensor:
        return self._handle(self._key_to_file[key]).get_tensor(key)

    def tensor_meta(self, key: str) -> tuple[str, list[int]]:
        sl = self._handle(self._key_to_file[key]).get_slice(key)
        return sl.get_dtype(), list(sl.get_shape())

    def source_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._key_to_file.values()))

    def close(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self._handles.clear()

    # ---- model skeleton ------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        return self._config

    def skeleton(self) -> nn.Module:
        """The model with parameters on ``meta`` and real buffers (rotary tables etc.)."""
        import transformers
        from accelerate import init_empty_weights

        auto_class = getattr(transformers, self.adapter.auto_class)
        with init_empty_weights(include_buffers=False):
            model = auto_class.from_config(self.config, trust_remote_code=self.trust_remote_code)
        model.eval()
        return model

    def materialize(self, model: nn.Module, prefix: str, device: torch.device, dtype: torch.dtype) -> None:
        """Load every parameter under ``prefix`` ('' for all) from the safetensors into ``model``."""
        from accelerate.utils import set_module_tensor_to_device

        try:
            for name, param in list(model.named_parameters(remove_duplicate=False)):
                if prefix and not (name == prefix or name.startswith(prefix + ".")):
                    continue
                key = self._checkpoint_key(name)
                value = self.tensor(key).to(dtype)
                set_module_tensor_to_device(model, name, device, value=value)
        finally:
            # Unmap the files: mapped pages we touched would otherwise stay in this process's RSS
            # for the whole run, and peak memory would appear to grow with depth.
            self.close()

    def release(self, model: nn.Module, prefix: str) -> None:
        """Send the parameters under ``prefix`` back to ``meta`` to free their memory."""
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(model.named_parameters(remove_duplicate=False)):
            if name.startswith(prefix + "."):
                set_module_tensor_to_device(model, name, "meta")

    def _checkpoint_key(self, param_name: str) -> str:
        if self.has(param_name):
            return param_name
        # Tied LM head: the checkpoint stores only the embedding matrix.
        if param_name == f"{self.adapter.lm_head}.weight" and self.adapter.ties_embeddings(self.config_dict):
            return f"{self.adapter.embeddings}.weight"
        raise ModelNotFoundError(
            f"the checkpoint has no tensor {param_name!r} that the model's code expects",
            hint="the weights do not match config.json/modeling code; check the model folder",
        )

    def non_block_prefixes(self, model: nn.Module) -> list[str]:
        """Top-level parameter owners outside the decoder blocks (embeddings, final norm, head...)."""
        blocks = self.adapter.blocks
        names = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters(remove_duplicate=False)}
        return sorted(n for n in names if not (n == blocks or n.startswith(blocks + ".")))

    def copyable_files(self) -> list[Path]:
        """Non-weight files that belong in the quantized repo: code, tokenizer, generation config."""
        files = []
        for p in sorted(self.path.iterdir()):
            if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(WEIGHT_SUFFIXES):
                files.append(p)
        return files
