"""Fidelity of a written checkpoint: reload it with ``from_pretrained`` and compare its logits to the
source model's on a few calibration batches.

The reference forward streams the source block by block (hooks materialise each block's weights
just before it runs and release them after), so verifying a large model needs no second full copy.
It is the model as a user loads it: the same classes, with the same in-memory repairs of published
remote code (families/compat.py), and its non-persistent buffers (rotary tables) are checked equal
to those ``from_pretrained`` gives the reloaded checkpoint, so a loading defect is reported as one
and never as quantization error. Non-finite reference logits stop the run.

:func:`block_output_errors` measures per decoder block instead: for every block ``i`` the source
model's own input to that block is captured, and both the full-precision and the quantized block are
run on it: ``err_i = ||q_i(x_i) - f_i(x_i)||^2 / ||f_i(x_i)||^2``. This isolates each block's
quantization error from error propagated from earlier blocks, which is how methods are compared
block by block (GPTQ/AWQ vs RTN). Both models are held in memory: meant for small models, tests and
benchmarks.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn as nn

from ..core import progress
from ..families import family_for_config
from ..methods.capture import record_calls
from .source import SourceModel


@torch.no_grad()
def reference_logits(source: SourceModel, tokens: torch.Tensor, device: torch.device, batch_size: int = 4) -> torch.Tensor:
    model = source.skeleton()
    adapter = source.adapter
    for prefix in source.non_block_prefixes(model):
        source.materialize(model, prefix, device, torch.float32)
    handles = []
    blocks = adapter.block_list(model)
    # A second stack over the blocks' weights (DiffusionGemma's encoder) runs all its layers before the
    # blocks: its layer i materialises block i's weights too, and releases them after.
    stacks = [blocks] + ([model.get_submodule(adapter.shared_stack.layers)] if adapter.shared_stack else [])
    batches = -(-len(tokens) // batch_size)
    with progress.step("verifying: the original, block by block", len(stacks) * len(blocks) * batches) as done:
        for layers in stacks:
            for index, layer in enumerate(layers):
                prefix = adapter.block_prefix(index)

                def load(module: nn.Module, args, kwargs=None, prefix=prefix):
                    source.materialize(model, prefix, device, torch.float32)

                def free(module: nn.Module, args, output, prefix=prefix):
                    source.release(model, prefix)
                    done.advance()

                handles += [layer.register_forward_pre_hook(load), layer.register_forward_hook(free)]
        try:
            logits = _logits(model, tokens, device, batch_size)
        finally:
            for h in handles:
                h.remove()
    from .preflight import check_finite_logits

    check_finite_logits(source, logits, f"{len(tokens)} verification samples")
    return logits


def _logits(model: nn.Module, tokens, device: torch.device, batch_size: int) -> torch.Tensor:
    """Logits per batch of ``tokens``: token windows ``[n, seqlen]``, or denoising windows
    (``denoising_calibration.DenoisingWindows``: the model's canvas logits on its noised windows)."""
    outs = []
    if not isinstance(tokens, torch.Tensor):
        for batch in tokens.batches(batch_size):
            outs.append(model(**batch.model_inputs(device)).logits.float().cpu())
        return torch.cat(outs)
    for start in range(0, tokens.shape[0], batch_size):
        out = model(input_ids=tokens[start : start + batch_size].to(device))
        logits = out.logits if hasattr(out, "logits") else out[0]
        outs.append(logits.float().cpu())
    return torch.cat(outs)


def _checkpoint_logits(model: nn.Module, tokens, device: torch.device, batch_size: int) -> torch.Tensor:
    with progress.step("verifying: the quantized checkpoint (batches)", -(-len(tokens) // batch_size)) as done:
        outs = []
        for start in range(0, len(tokens), batch_size):
            part = tokens[start : start + batch_size] if isinstance(tokens, torch.Tensor) else \
                tokens.select(slice(start, start + batch_size))
            outs.append(_logits(model, part, device, batch_size))
            done.advance()
    return torch.cat(outs)


def load_quantized(folder: Path, auto_class: str, trust_remote_code: bool, device: torch.device) -> nn.Module:
    import transformers

    from transformers.utils import logging as hf_logging

    cls = getattr(transformers, auto_class)
    if trust_remote_code:
        prepare_folder_code(folder, auto_class)
    hf_logging.disable_progress_bar()  # our own progress is on screen; theirs would interleave
    try:
        model = cls.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    return model.to(device).eval()


def prepare_folder_code(folder: Path | str, auto_class: str, auto_map: dict | None = None) -> list[str]:
    """Repair, in memory, the remote-code classes of a checkpoint folder before transformers builds
    them (what the registration lines of a self-contained checkpoint do when it is loaded).
    ``folder`` may be a Hub id when its config's ``auto_map`` is given."""
    import json
    import sys

    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from ..families import compat

    if auto_map is None:
        auto_map = json.loads((Path(folder) / "config.json").read_text()).get("auto_map") or {}
    refs = [auto_map.get("AutoConfig"), auto_map.get(auto_class)]
    refs += [v for k, v in auto_map.items() if k.startswith("AutoModel") and v not in refs]
    installed: list[str] = []
    for ref in refs:
        ref = ref[0] if isinstance(ref, (list, tuple)) else ref
        if not isinstance(ref, str) or "--" in ref:
            continue
        cls = get_class_from_dynamic_module(ref, str(folder))
        installed += compat.repair_module(sys.modules[cls.__module__])
    return installed


def check_buffers_match(source: SourceModel, model: nn.Module) -> None:
    """The reloaded model's non-persistent buffers (rotary tables...) must equal the reference's:
    a difference is a loading defect, which would otherwise be reported as quantization error."""
    from ..errors import UnsupportedModelError

    reference = dict(source.skeleton().named_buffers())
    # Persistent buffers (a router's expert_bias) are loaded from the checkpoint, which holds the
    # source's values; the skeleton only has their initial values, so they are not compared here.
    persistent = {f"{prefix}.{b}" if prefix else b for prefix, module in model.named_modules()
                  for b in module._buffers if b not in module._non_persistent_buffers_set}
    for name, buf in model.named_buffers():
        if name in persistent:
            continue
        ref = reference.get(name)
        if ref is None or ref.device.type == "meta" or ref.shape != buf.shape or not ref.is_floating_point():
            continue
        got, want = buf.detach().float().cpu(), ref.detach().float().cpu()
        if not (torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-3, atol=1e-6)):
            raise UnsupportedModelError(
                f"the reloaded checkpoint's buffer {name} differs from the model's definition "
                f"(max difference {float((got - want).abs().nan_to_num(float('inf')).max()):.3g})",
                hint="from_pretrained leaves this buffer as the model's code does not expect under the installed "
                "transformers; the quantized weights are not the cause. Report it with the model name",
            )


@torch.no_grad()
def relative_output_error(
    source: SourceModel, folder: Path, tokens: torch.Tensor, device: torch.device
) -> float:
    """``||logits_q - logits_ref||_F / ||logits_ref||_F`` over ``tokens``. Families with an encoder stack
    beside their decoder (DiffusionGemma) are compared on the decoder's canvas logits of noised windows
    (clean context, noised canvas, self-conditioning: ``denoising_calibration.py``)."""
    if source.adapter.shared_stack is not None:
        from .denoising_calibration import denoising_windows

        tokens = denoising_windows(tokens, source.config, seed=1)
    ref = reference_logits(source, tokens, device)
    model = load_quantized(folder, source.adapter.auto_class, source.trust_remote_code, device)
    check_buffers_match(source, model)
    got = _checkpoint_logits(model, tokens, device, batch_size=4)
    del model
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


@torch.no_grad()
def block_output_errors(
    source: str | Path, quantized: str | Path, tokens: torch.Tensor, *, trust_remote_code: bool = True
) -> list[float]:
    """Per decoder block, the relative squared output error of the quantized block on the source
    model's own input to that block (module docstring)."""
    import transformers
    from transformers.utils import logging as hf_logging

    adapter = family_for_config(json.loads((Path(source) / "config.json").read_text()))
    hf_logging.disable_progress_bar()
    cls = getattr(transformers, adapter.auto_class)
    fp, q = (cls.from_pretrained(Path(folder), trust_remote_code=trust_remote_code, dtype=torch.float32).eval()
             for folder in (source, quantized))
    fp_blocks, q_blocks = adapter.block_list(fp), adapter.block_list(q)
    with ExitStack() as stack:
        calls = [stack.enter_context(record_calls(block)) for block in fp_blocks]
        fp(input_ids=tokens)
    errors = []
    for recorded, fb, qb in zip(calls, fp_blocks, q_blocks):
        num = den = 0.0
        for hidden, args, kwargs in zip(recorded.hidden, recorded.call_args, recorded.call_kwargs):
            ref, got = _first(fb(hidden, *args, **kwargs)), _first(qb(hidden, *args, **kwargs))
            num += (got - ref).double().pow(2).sum().item()
            den += ref.double().pow(2).sum().item()
        errors.append(num / den)
    return errors


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
