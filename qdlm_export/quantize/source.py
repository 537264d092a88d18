"""A source model on disk, read lazily: config, family adapter, and tensors memory-mapped from its
safetensors, materialised into a weightless skeleton one block at a time.

This is what keeps peak memory near one block: the skeleton's parameters live on the ``meta``
device until a block is needed, and go back there once it has been written.

Fused experts are served unfused (:mod:`.fused_experts`: per-expert 2-D keys slicing the stored 3-D
tensors, read whole through ``stored_*``); a shared stack comes with its blocks (:mod:`.shared_stack_view`).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ..core.remote_code import needs_remote_code
from ..errors import CheckpointError, InputDataError, ModelNotFoundError, UnsupportedModelError, json_kind
from ..families import FamilyAdapter, family_for_config
from ..format.model_files import COPIED_PATTERNS, copyable_model_files  # noqa: F401 (COPIED_PATTERNS: docs/FORMAT.md)
from ..format.reader import INDEX_FILE, CheckpointReader, link_roots, stays_inside
from ..format.tensor_headers import TensorEntry, read_safetensors_header
from .fused_experts import ExpertSlice, expert_slices, unfuse_model
from .shared_stack_view import in_shared_layers, share_counterpart, share_modules, shared_layer_prefix


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
            allow_patterns=["*.json", "*.py", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja",
                            "README.md"],  # the card: its license goes into the quantized model's card
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
    fix = "re-download the model, or re-save its config with save_pretrained()"
    data = config_file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"{config_file} is not UTF-8 text (byte 0x{data[exc.start]:02X} at offset {exc.start})",
            hint=f"config.json must be UTF-8 JSON; {fix}",
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputDataError(
            f"{config_file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", hint=fix
        ) from None
    if not isinstance(config, dict):
        raise InputDataError(
            f"{config_file} holds a JSON {json_kind(config)}, not an object of config keys",
            hint=f"config.json must be one JSON object ({{\"model_type\": ..., ...}}); {fix}",
        )
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise InputDataError(
            f"{config_file}: model_type is a JSON {json_kind(model_type)} ({model_type!r}), not a string", hint=fix
        )
    return config


def _not_safetensors(file: Path, reason: str) -> InputDataError:
    return InputDataError(
        f"{file} is not a valid safetensors file (truncated?): {reason}",
        hint="the download or save was probably interrupted; re-download the model, or re-save it with "
        "save_pretrained(..., safe_serialization=True)",
    )


def _check_inside(file: Path, folder: Path, what: str) -> None:
    if not stays_inside(file, link_roots(folder)):
        raise InputDataError(
            f"{what} {file.name} in {folder} resolves to {file.resolve()}, outside the model folder; it was not read",
            hint="weights are read only from inside the model folder; copy the file into the folder "
            "(not a link to elsewhere) if it really belongs to this model",
        )


def _config_int(config: dict[str, Any], keys: tuple[str, ...], file: Path) -> tuple[str | None, int | None]:
    """The first of ``keys`` set in the config, checked to be a positive integer; (None, None) if unset."""
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputDataError(
                f"{file}: {key}={value!r} is not a positive integer",
                hint="config.json is damaged or hand-edited; use the config the weights were saved with",
            )
        return key, value
    return None, None


def check_finite(value: torch.Tensor, key: str, file: Path) -> None:
    """NaN or Inf in a source tensor is an error naming it (floating-point tensors only)."""
    if not value.is_floating_point():
        return
    value = value.to(torch.float16) if value.element_size() == 1 else value  # float8: no min/max kernel
    # min and max propagate NaN and show an Inf: one reduction, no mask (40x faster than isfinite()).
    if value.numel() == 0 or all(math.isfinite(v.item()) for v in torch.aminmax(value)):
        return
    nan = int(torch.isnan(value).sum())
    inf = int(torch.isinf(value).sum())
    first = int((~torch.isfinite(value)).flatten().nonzero()[0])
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), value.shape))
    raise InputDataError(
        f"source tensor {key} in {file.name} holds non-finite values ({nan} NaN, {inf} Inf; "
        f"first at index {list(where)})",
        hint="the source weights are damaged (re-download them) or were saved after a diverged training step; "
        "pass --allow-non-finite to quantize them anyway",
    )


def return_freed_memory() -> None:
    """Hand memory freed by a released block back to the system. glibc keeps freed heap pages of
    many small allocations; without this the next block's tensors add to them and the peak RSS grows
    past one block. A no-op where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class SourceModel:
    path: Path
    config_dict: dict[str, Any]
    adapter: FamilyAdapter
    trust_remote_code: bool
    model_id: str  # what the user passed: a Hub id or a path
    # NaN/Inf in a source tensor is an error unless allowed (some checkpoints hold unused inf rows).
    allow_non_finite: bool = False
    _entries: dict[str, TensorEntry] = field(default_factory=dict)  # every tensor of the model, by name
    _fused: dict[str, dict[str, ExpertSlice]] = field(default_factory=dict)  # stored 3-D name -> its expert keys
    _views: dict[str, ExpertSlice] = field(default_factory=dict)  # those keys -> the slice they are
    _reader: CheckpointReader | None = None
    _config: Any = None

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, model: str, *, trust_remote_code: bool = False, revision: str | None = None,
        allow_non_finite: bool = False,
    ) -> "SourceModel":
        path = resolve_model_path(model, revision=revision)
        config = read_config_dict(path)
        if config.get("quantization_config"):
            qconfig = config["quantization_config"]
            method = qconfig.get("quant_method", "?") if isinstance(qconfig, dict) else "?"
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
        source = cls(path=path, config_dict=config, adapter=adapter, trust_remote_code=trust_remote_code,
                     model_id=model, allow_non_finite=allow_non_finite)
        source._index_tensors()
        source.check_config_matches_weights()
        return source

    def _index_tensors(self) -> None:
        """Map every tensor name to its file, reading only safetensors headers. With an index file,
        exactly the files it lists (each inside the folder, each holding the tensors listed for it);
        without one, every ``*.safetensors`` of the folder."""
        index = self._read_index()
        files = sorted(set(index.values())) if index is not None else sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            raise ModelNotFoundError(
                f"{self.path} has no .safetensors weights" + (f" (found {', '.join(pickles)})" if pickles else ""),
                hint="qdlm-export reads safetensors only, never pickled weights; convert the checkpoint to "
                "safetensors first (e.g. save_pretrained(..., safe_serialization=True))",
            )
        for f in files:
            _check_inside(f, self.path, "weight file")
            if f.stat().st_size == 0:
                raise _not_safetensors(f, "the file is empty (0 bytes)")
            try:
                entries = read_safetensors_header(f)
            except CheckpointError as exc:  # bad header, header beyond the file, short data
                raise _not_safetensors(f, exc.message) from None
            for key, entry in entries.items():
                if key in self._entries and index is None:
                    raise InputDataError(
                        f"tensor {key} is stored twice, in {self._entries[key].file} and {f.name}",
                        hint=f"the folder holds weight files of two different saves; keep one set (or add "
                        f"the {INDEX_FILE} that lists the right files)",
                    )
                self._entries[key] = entry
        if index is not None:
            for key, f in index.items():
                if key not in self._entries or Path(self._entries[key].path) != f:
                    raise InputDataError(
                        f"{INDEX_FILE} lists tensor {key} in {f.name}, but that file does not hold it",
                        hint="the index and the weight files are from different saves; re-download the model",
                    )
            for key in [k for k in self._entries if k not in index]:
                del self._entries[key]  # in a listed file but not in the index: not part of the model
        self._reader = CheckpointReader(self.path, self._entries)
        self._fused = expert_slices(self.adapter, {k: tuple(e.shape) for k, e in self._entries.items()})
        self._views = {key: view for views in self._fused.values() for key, view in views.items()}

    def _read_index(self) -> dict[str, Path] | None:
        """The index file's weight_map as tensor -> file, with every entry checked to name a file
        inside the model folder; None when there is no index."""
        index_file = self.path / INDEX_FILE
        if not index_file.exists():
            return None
        fix = "re-download the model, or re-save it with save_pretrained(..., safe_serialization=True)"
        _check_inside(index_file, self.path, "index file")
        try:
            data = json.loads(index_file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputDataError(f"{index_file} is not valid UTF-8 JSON ({exc})", hint=fix) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputDataError(f"{index_file} has no \"weight_map\" object of tensor names to files", hint=fix)
        index: dict[str, Path] = {}
        for key, name in weight_map.items():
            entry = f"{index_file} entry {key!r} -> {name!r}"
            if not isinstance(name, str) or not name:
                raise InputDataError(f"{entry} is not a file name", hint=fix)
            rel = Path(name)
            if rel.is_absolute() or ".." in rel.parts or "\\" in name:
                raise InputDataError(
                    f"{entry} points outside the model folder; refused",
                    hint="index entries must be file names inside the model folder (no absolute paths, no '..')",
                )
            if not name.endswith(".safetensors"):
                raise InputDataError(f"{entry} is not a .safetensors file", hint="qdlm-export reads safetensors only")
            file = self.path / rel
            if not file.is_file():
                raise InputDataError(f"{entry}: {name} does not exist in {self.path}", hint=fix)
            _check_inside(file, self.path, "weight file")
            index[key] = file
        return index

    def check_config_matches_weights(self) -> None:
        """Compare config.json's sizes with the tensor shapes in the safetensors headers, so a config
        that does not describe these weights is named here, before any work."""
        adapter = self.adapter  # multimodal configs keep the text sizes in a section; top-level keys first
        config = {**adapter.text_config(self.config_dict), **self.config_dict}
        cfg = self.path / "config.json"
        blocks_prefix = adapter.blocks + "."
        present = sorted({int(k[len(blocks_prefix):].split(".", 1)[0]) for k in self._entries
                          if k.startswith(blocks_prefix) and k[len(blocks_prefix):].split(".", 1)[0].isdigit()})
        layers_key, layers = _config_int(config, adapter.num_layers_keys, cfg)
        if layers_key is None:
            raise InputDataError(
                f"{cfg} sets none of {', '.join(adapter.num_layers_keys)} (the number of "
                f"{adapter.name} decoder blocks)",
                hint="config.json is incomplete; use the config the weights were saved with",
            )
        if present and layers != len(present):
            raise InputDataError(
                f"{cfg}: {layers_key}={layers}, but the weights hold {len(present)} blocks "
                f"({adapter.blocks}.{present[0]} to {adapter.blocks}.{present[-1]})",
                hint=f"config.json does not describe these weights; set {layers_key} to {len(present)} "
                "or use the weights this config was saved with",
            )
        if present != list(range(len(present))):
            missing = sorted(set(range(present[-1] + 1)) - set(present))
            raise InputDataError(
                f"the weights have no block {adapter.blocks}.{missing[0]} (blocks present: {len(present)})",
                hint="a weight file is missing or incomplete; re-download the model",
            )

        def check(key_and_value, tensor: str, dim: int) -> None:
            key, value = key_and_value
            if key is None or not self.has(tensor):
                return
            _, shape = self.tensor_meta(tensor)
            if len(shape) > dim and shape[dim] != value:
                raise InputDataError(
                    f"{cfg}: {key}={value} does not match tensor {tensor} of shape {list(shape)}",
                    hint="config.json does not describe these weights; use the config they were saved with",
                )

        hidden = _config_int(config, adapter.hidden_size_keys, cfg)
        check(hidden, f"{adapter.embeddings}.weight", 1)
        inter = _config_int(config, adapter.intermediate_size_keys, cfg)
        first = adapter.block_prefix(0)
        for group in adapter.groups:
            for name in group.linears:
                if group.role == "gate_up":
                    check(inter, f"{first}.{name}.weight", 0)
                if group.role in ("qkv", "attn_out"):
                    check(hidden, f"{first}.{name}.weight", 1 if group.role == "qkv" else 0)
                if group.role == "down":
                    check(inter, f"{first}.{name}.weight", 1)
                    check(hidden, f"{first}.{name}.weight", 0)

    # ---- tensors -------------------------------------------------------------------------------
    # The model's tensors as quantization sees them: fused experts as per-expert 2-D keys.
    def keys(self) -> list[str]:
        return [name for key in self._entries for name in self._fused.get(key, (key,))]

    def has(self, key: str) -> bool:
        return key in self._views or (key in self._entries and key not in self._fused)

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor, memory-mapped; a per-expert key is a view of its stored 3-D tensor."""
        view = self._served(key)
        return view.take(self.stored_tensor(view.stored)) if view is not None else self.stored_tensor(key)

    def tensor_meta(self, key: str) -> tuple[str, list[int]]:
        view = self._served(key)
        return (self._entries[view.stored].dtype, list(view.shape)) if view is not None else self.stored_meta(key)

    def _served(self, key: str) -> ExpertSlice | None:
        if key in self._fused:
            raise KeyError(f"{key} is served as per-expert tensors (keys()); stored_tensor() reads it whole")
        return self._views.get(key)

    # The tensors as the checkpoint stores them.
    def stored_keys(self) -> list[str]:
        return list(self._entries)

    def stored_tensor(self, key: str) -> torch.Tensor:
        try:
            return self._reader.get(key)
        except Exception as exc:  # SafetensorError: the data region changed or broke since the header
            raise _not_safetensors(Path(self._entries[key].path), f"tensor {key}: {exc}") from None

    def stored_meta(self, key: str) -> tuple[str, list[int]]:
        return self._entries[key].dtype, list(self._entries[key].shape)

    def _entry(self, key: str) -> TensorEntry:  # the stored tensor holding ``key`` (its file, for messages)
        return self._entries[self._views[key].stored if key in self._views else key]

    def source_bytes(self) -> int:
        return sum(Path(f).stat().st_size for f in {e.path for e in self._entries.values()})

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    # ---- model skeleton ------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        if self._config is None:
            from transformers import AutoConfig

            from .preflight import prepare_config, remote_code_error

            try:
                self._config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
            except Exception as exc:
                if not (self.trust_remote_code and self.config_dict.get("auto_map")):
                    raise
                raise remote_code_error(self, exc, "loading its config class") from None
            prepare_config(self, self._config)  # known transformers-5 incompatibilities (families/compat.py)
        return self._config

    def skeleton(self) -> nn.Module:
        """The model with parameters on ``meta`` and real buffers (rotary tables etc.)."""
        import transformers
        from accelerate import init_empty_weights

        from ..families.compat import repair_rotary_buffers
        from .preflight import prepare_model_code, remote_code_error

        auto_class = getattr(transformers, self.adapter.auto_class)
        config = self.config
        prepare_model_code(self)  # repairs the model classes in memory before they are built
        try:
            with init_empty_weights(include_buffers=False):
                model = auto_class.from_config(config, trust_remote_code=self.trust_remote_code)
        except Exception as exc:
            if not (self.trust_remote_code and self.config_dict.get("auto_map")):
                raise
            raise remote_code_error(self, exc, "building the model from its config") from None
        repair_rotary_buffers(model)
        unfuse_model(model, self.adapter)
        model.eval()
        return model

    def materialize(self, model: nn.Module, prefix: str, device: torch.device, dtype: torch.dtype) -> None:
        """Load every parameter under ``prefix`` ('' for all) from the safetensors into ``model``.

        With a shared stack: a block also brings its shared layer, which computes with the block's
        modules (:func:`share_modules`) and loads the tensors stored as its own (a ``layer_scalar``);
        a module of the shared stack outside its layers becomes the module it is stored as."""
        try:
            aliased = bool(prefix) and share_counterpart(model, self.adapter, prefix) is not None
            self._load(model, prefix, device, dtype, aliased)
            layer = shared_layer_prefix(self.adapter, prefix)
            if layer is not None:
                share_modules(model.get_submodule(prefix), model.get_submodule(layer))
                self._load(model, layer, device, dtype, True)
        finally:
            # Unmap the files: mapped pages we touched would otherwise stay in this process's RSS
            # for the whole run, and peak memory would appear to grow with depth.
            self.close()

    def _load(self, model: nn.Module, prefix: str, device: torch.device, dtype: torch.dtype, only_meta: bool) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, param in list(model.named_parameters(remove_duplicate=False)):
            if prefix and not (name == prefix or name.startswith(prefix + ".")):
                continue
            if only_meta and param.device.type != "meta":
                continue  # a module of the blocks', loaded with them
            key = self._checkpoint_key(name)
            value = self.tensor(key)
            if tuple(value.shape) != tuple(param.shape):
                raise InputDataError(
                    f"tensor {key} in {self._entry(key).file} has shape {list(value.shape)}, but "
                    f"config.json builds {name} with shape {list(param.shape)}",
                    hint="config.json does not describe these weights; use the config they were saved with",
                )
            if not self.allow_non_finite:
                check_finite(value, key, Path(self._entry(key).path))
            # dtype= is needed: without it accelerate casts the value back to the skeleton's dtype
            # (the checkpoint's, e.g. bf16), and blocks would not compute in the compute dtype.
            set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
        for name, buffer in list(model.named_buffers(remove_duplicate=False)):
            if prefix and not name.startswith(prefix + "."):
                continue
            if self.has(name):  # persistent buffers the checkpoint stores (a router's expert_bias)
                # a copy: a same-dtype .to() would be a view that keeps the whole shard mapped
                value = self.tensor(name).to(buffer.dtype, copy=True)
                set_module_tensor_to_device(model, name, device, value=value)

    def release(self, model: nn.Module, prefix: str) -> None:
        """Send the parameters under ``prefix`` (and a block's shared layer) back to ``meta``."""
        from accelerate.utils import set_module_tensor_to_device

        heads = tuple(p + "." for p in (prefix, shared_layer_prefix(self.adapter, prefix)) if p is not None)
        for name, param in list(model.named_parameters(remove_duplicate=False)):
            if name.startswith(heads) and param.device.type != "meta":
                set_module_tensor_to_device(model, name, "meta")
        return_freed_memory()

    def _checkpoint_key(self, param_name: str) -> str:
        if self.has(param_name):
            return param_name
        # The shared stack's tensors are stored once, under the blocks' names (its own buffers aside).
        stack = self.adapter.shared_stack
        stored = stack.stored_name(param_name) if stack is not None else None
        if stored is not None and self.has(stored):
            return stored
        # Tied LM head: the checkpoint stores only the embedding matrix.
        if param_name == f"{self.adapter.lm_head}.weight" and self.adapter.ties_embeddings(self.config_dict):
            return f"{self.adapter.embeddings}.weight"
        raise ModelNotFoundError(
            f"the checkpoint has no tensor {param_name!r} that the model's code expects",
            hint="the weights do not match config.json/modeling code; check the model folder",
        )

    def non_block_prefixes(self, model: nn.Module) -> list[str]:
        """Top-level parameter owners outside the decoder blocks (embeddings, final norm, head...) and
        outside the shared stack's layers (materialised with their blocks)."""
        blocks = self.adapter.blocks
        names = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters(remove_duplicate=False)}
        return sorted(n for n in names if not (n == blocks or n.startswith(blocks + "."))
                      and not in_shared_layers(self.adapter, n))

    def copyable_files(self) -> list[Path]:
        """The source's own model files that belong in the quantized repo (:func:`copyable_model_files`)."""
        return copyable_model_files(self.path)
