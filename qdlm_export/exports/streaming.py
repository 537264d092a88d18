"""``quantize --format gptq|awq|compressed-tensors``: each quantized linear converted as the pipeline
produces it, from its in-memory :class:`~qdlm_export.core.schemes.QuantizedWeight`, and streamed into
the export's shards; no native checkpoint is read back.

:class:`ConvertingSink` is a ``format.writer.TensorSink``. The caller (``quantize.api``) drives it::

    sink = ConvertingSink(stage, "gptq", {"weights": ..., "activations": ...})
    run_pipeline(..., sink)                   # or TeeSink(native_writer, sink) to verify the native result
    sink.close()
    sink.check(qconfig)                       # the complete native quantization_config: scheme refusals
    sink.finish(native_dir, qconfig, repo_id=...)   # config, model files, report, card
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..core.schemes import QuantizedWeight
from ..errors import CheckpointError, UnsupportedModelError
from ..families import family_for_config
from ..format.spec import FUSED_EXPERTS_KEY
from ..format.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from .convert import get_format, raise_problems
from .export_folder import write_export_files
from .export_format import ExportInventory, has_fused_experts, unfused_module_names
from .quantized_module import InMemoryLinear, QuantizedModule

_WHERE = "this checkpoint"


class ConvertingSink:
    """Writes the ``to`` export of what the pipeline produces into the empty folder ``folder``.

    ``qconfig``: the native ``quantization_config`` as far as it is known before quantizing (at least
    ``weights``; ``activations`` for weight-activation schemes). A linear the target cannot hold is
    refused when it arrives, with the messages ``convert`` gives.
    """

    def __init__(self, folder: str | Path, to: str, qconfig: dict[str, Any], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.target = get_format(to)
        self.folder = Path(folder)
        self._qconfig = qconfig
        self._writer = ShardedWriter(self.folder, max_shard_bytes)
        self._modules: dict[str, QuantizedModule] = {}
        self._passthrough: list[tuple[str, tuple[int, ...]]] = []

    def add_linear(self, name: str, qweight: QuantizedWeight) -> None:
        linear = InMemoryLinear.build(name, qweight, self._qconfig.get("activations"))
        m = linear.module
        raise_problems([f"{name}: {p}" for p in self.target.module_problems(m, self._qconfig)], self.target, _WHERE)
        self._writer.add_all(name, self.target.module_tensors(m, linear, self._qconfig))
        self._modules[name] = m

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.add(name, self.target.passthrough(name, tensor))
        self._passthrough.append((name, tuple(tensor.shape)))

    def close(self) -> list[Path]:
        """Finish the shards; returns their paths."""
        return self._writer.close()

    def manifest(self) -> dict[str, dict]:
        return self._writer.manifest()

    def check(self, qconfig: dict[str, Any]) -> None:
        """The target's refusals of the complete native ``quantization_config`` (online transforms the
        method added, overrides, the quantized head...), before verification and the folder's files."""
        raise_problems(self.target.config_problems(qconfig), self.target, _WHERE)

    def finish(self, native_dir: Path, qconfig: dict[str, Any], *, repo_id: str) -> dict[str, Any]:
        """Write config, model files, report and card from ``native_dir`` (its ``config.json``, report,
        card and model files; no weights needed). Returns the target's ``quantization_config``."""
        native_config = json.loads((Path(native_dir) / "config.json").read_text())
        self.check(_with_fused_experts_marked(qconfig, native_config))
        # Fused experts: the native config lists stacked projections; the export holds the per-expert
        # linears the pipeline handed over (the layout vLLM reads), one module each.
        names = unfused_module_names(qconfig)
        missing = [name for name in names if name not in self._modules]
        if missing:
            raise CheckpointError(
                f"{len(missing)} quantized module(s) of the checkpoint never reached the {self.target.name} export "
                f"(e.g. {missing[0]})", hint="this is a bug in qdlm-export: please report it with the command")
        modules = [self._modules[name] for name in names]
        # Sorted by name: the order convert() lists them in for a single-shard native folder.
        inventory = ExportInventory(qconfig=qconfig, modules=modules, passthrough=sorted(self._passthrough))
        return write_export_files(Path(native_dir), self.folder, self.target, native_config, inventory,
                                  self.manifest(), model_card=True, repo_id=repo_id)


def _with_fused_experts_marked(qconfig: dict[str, Any], native_config: dict[str, Any]) -> dict[str, Any]:
    """``qconfig`` for the targets' refusals: a family whose experts are fused gets its per-expert
    modules' experts named under ``fused_experts`` even when the run stacked nothing (no native
    checkpoint written, so no stacking sink recorded the section), so that the fused-experts refusals
    (``export_format.fused_experts_problems``, the target's own) still apply."""
    if has_fused_experts(qconfig):
        return qconfig
    try:
        fused = family_for_config(native_config).fused_experts
    except UnsupportedModelError:
        return qconfig
    if fused is None:
        return qconfig
    expert = re.compile(rf"^(.*\.{re.escape(fused.module)})\.\d+\.")
    modules = {m.group(1): {} for name in qconfig.get("quantized_modules") or [] if (m := expert.match(name))}
    return dict(qconfig, **{FUSED_EXPERTS_KEY: modules}) if modules else qconfig
