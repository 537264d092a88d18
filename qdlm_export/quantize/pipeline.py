"""The layer-by-layer driver: materialise a block, calibrate and quantize it, write it, propagate
the calibration activations through the *quantized* block, free it, next.

Peak memory is one block (plus embeddings/head and the calibration activations), independent of
depth. No graph tracing: a hook records what the model passes to its first block
(``methods/capture.py``), which is all a block needs to be re-run (dLLMs ship custom modelling code
that tracing would break on). With ``--include-lm-head`` the head is quantized last, by the method,
calibrated on the last block's outputs (the final norm's inputs).

Results go to a sink (``format.writer.TensorSink``) chosen by the caller: the native writer, an
export's converting sink, or both; the pipeline knows no output format.

Weight-activation methods leave quantized linears in each block; the pipeline builds them for the
method (:func:`build_quantized_linear`): the loader's ``QdlmLinear`` from the format's spec of the
module, so calibration propagates through exactly what ``from_pretrained`` computes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core import progress
from ..core.schemes import QuantizedWeight
from ..errors import ConfigError
from ..format.spec import ST_FLOAT_DTYPES, linear_tensors, quantized_linear_spec
from ..format.writer import TensorSink
from ..methods.base import BlockCalibration, QuantMethod
from ..methods.capture import MEMO_BUDGET_BYTES, ForwardStopped, record_calls
from .calibration import available_memory
from .source import SourceModel


@dataclass
class PipelineResult:
    quantized_modules: list[str] = field(default_factory=list)
    modules_not_converted: list[str] = field(default_factory=list)
    module_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # module name -> its online input transforms (the checkpoint's transforms.modules)
    module_transforms: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    linear_params: int = 0
    linear_bytes_original: int = 0
    linear_bytes_quantized: int = 0
    seconds_per_block: list[float] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    from ..core.arguments import check_device

    device = check_device(device)  # a ConfigError naming the value, not torch's RuntimeError
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for, but no CUDA device is available", hint="use --device cpu")
    return torch.device(device)


def default_compute_dtype(device: torch.device) -> torch.dtype:
    # float32 on CPU (bf16 matmuls there are slow and coarse); bf16 on GPUs, Hessians stay float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int, device: torch.device,
    attention_mask: torch.Tensor | None = None,
) -> BlockCalibration:
    """What the model passes to its first block, per batch of ``tokens``; nothing after it runs.

    ``attention_mask``: a ``[1, 1, seqlen, seqlen]`` additive mask (``block_calibration.attention_mask``)
    given to the model's forward for every batch, expanded to the batch without a copy; the model hands
    it on to block 0, so it lands in each batch's recorded call arguments and reaches every block's
    forward during capture and propagation. None: the model's forward without a mask, as before."""
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    with record_calls(blocks[0], stop=True) as calls:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            inputs = {"input_ids": batch}
            if attention_mask is not None:
                # transformers 4's mask preparation, which the published code calls, wants the batch size
                inputs["attention_mask"] = attention_mask.expand(batch.shape[0], -1, -1, -1)
            if _accepts_use_cache(model):
                inputs["use_cache"] = False
            try:
                model(**inputs)
            except ForwardStopped:
                pass
    if not calls.hidden:
        raise RuntimeError("the model never called its first decoder block; check the family adapter's `blocks`")
    return BlockCalibration(hidden=calls.hidden, call_args=calls.call_args, call_kwargs=calls.call_kwargs)


def build_quantized_linear(
    full_name: str, qweight: QuantizedWeight, activations: dict[str, Any] | None, device: torch.device
) -> nn.Module:
    """The loader's quantized linear for ``qweight``, filled with the very tensors that will be written
    (the builder weight-activation methods are built with: ``methods.base.QuantizedLinearBuilder``)."""
    from ..loader.hf_quantizer import QdlmLinear  # the loader imports transformers; keep it out of import time

    spec = quantized_linear_spec(full_name, qweight, activations=activations)
    module = QdlmLinear(spec, device=device)
    tensors = linear_tensors(qweight)
    expected = set(spec.tensors())
    if set(tensors) != expected:
        raise RuntimeError(f"{full_name}: tensors {sorted(tensors)} do not match the format's {sorted(expected)}")
    for suffix, value in tensors.items():
        getattr(module, suffix).copy_(value)
    return module


def _accepts_use_cache(model: nn.Module) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _source_dtype(source: SourceModel, key: str, fallback: torch.dtype) -> torch.dtype:
    if source.has(key):
        return ST_FLOAT_DTYPES.get(source.tensor_meta(key)[0], fallback)
    return fallback


def memo_budget(block: nn.Module) -> int:
    """Bytes the memo of linear outputs may hold for ``block``: a quarter of the memory still available
    on the block's device, at most 8 GiB (1 GiB when the system does not say). A quarter leaves the
    block's solve and the next block's weights their room; the memo needs about 70 MB per
    hidden-1024 block and 0.4 GB per LLaDA-8B block for 16 x 128 tokens, 8x that for 128 x 512."""
    param = next(block.parameters(), None)
    available = available_memory(param.device if param is not None else "cpu")
    if available is None:
        return MEMO_BUDGET_BYTES
    return min(available // 4, 8 << 30)


@torch.no_grad()
def quantize_block(
    method: QuantMethod, block: nn.Module, prefix: str, calib: BlockCalibration | None, *, propagate: bool
) -> dict[str, QuantizedWeight]:
    """One step of the walk: the method quantizes ``block`` (every listed linear, or an error), then
    ``calib`` moves on to the quantized block's outputs -- the next block's inputs, or after the last
    block the head's when the head is quantized (``propagate`` False)."""
    # A method that only changes linear weights lets every pass over the block, the carrying one
    # included, reuse the outputs of the linears it has not changed since the previous pass.
    reuse = calib is not None and method.reuses_linear_outputs
    with calib.reusing_linear_outputs(block, memo_budget(block)) if reuse else nullcontext():
        qweights = method.quantize_block(block, prefix, calib)
        missing = [f"{prefix}.{n}" for n in method.adapter.linear_names if f"{prefix}.{n}" not in qweights]
        if missing:
            raise RuntimeError(f"method {method.name} did not quantize {', '.join(missing)}")
        if calib is not None and (propagate or method.config.include_lm_head):
            calib.hidden = calib.run(block)  # the last pass the memo serves
    return qweights


@torch.no_grad()
def run_pipeline(
    source: SourceModel,
    method: QuantMethod,
    sink: TensorSink,
    *,
    calib_tokens: torch.Tensor | None,
    device: torch.device,
    compute_dtype: torch.dtype,
    batch_size: int = 8,
    on_block: Callable[[int, int], None] | None = None,
    calib_attention_mask: torch.Tensor | None = None,
    denoising: tuple[str, int] | None = None,
) -> PipelineResult:
    """``calib_attention_mask``: the additive mask calibration windows run with (block-diffusion
    families: ``block_calibration.attention_mask``); None: the model's forward without one.

    ``denoising``: ``(mode, seed)`` for families with an encoder stack over the blocks' weights
    (``FamilyAdapter.shared_stack``): the windows are noised the way the sampler sees them
    (``denoising_calibration.py``, mode "denoising" or "encoder") and each step walks encoder layer ``i``
    and decoder layer ``i`` together (``paired_walk.PairedLayer``); the decoder layer is what is written."""
    adapter = source.adapter
    model = source.skeleton()
    blocks = adapter.block_list(model)
    result = PipelineResult()

    # Everything outside the blocks (embeddings, final norm, head) stays resident: it is needed to
    # compute block-0 inputs and is small next to the blocks of a large model.
    for prefix in source.non_block_prefixes(model):
        source.materialize(model, prefix, device, compute_dtype)
    method.prepare(model)

    calib = None
    if method.needs_calibration:
        if calib_tokens is None:
            raise ConfigError(f"method {method.name} needs calibration data")
        if adapter.shared_stack is not None:
            calib = _capture_denoising(source, model, calib_tokens, denoising or ("denoising", 0), batch_size, device)
        else:
            calib = capture_block_inputs(model, blocks, calib_tokens, batch_size, device, calib_attention_mask)

    with progress.step("quantizing blocks", len(blocks)) as blocks_done:
        for index in range(len(blocks)):
            started = time.perf_counter()
            prefix = adapter.block_prefix(index)
            source.materialize(model, prefix, device, compute_dtype)
            block = blocks[index]
            walked = _paired(model, adapter, index) if adapter.shared_stack is not None else block
            qweights = quantize_block(method, walked, prefix, calib, propagate=index + 1 < len(blocks))
            _write_block(source, sink, block, prefix, qweights, result)
            source.release(model, prefix)
            result.seconds_per_block.append(time.perf_counter() - started)
            blocks_done.advance()
            if on_block is not None:
                on_block(index + 1, len(blocks))

    head_calib = BlockCalibration(hidden=calib.hidden) if calib is not None else None
    if calib is not None and adapter.shared_stack is not None:  # the head reads the canvas rows only
        from .paired_walk import unpack

        context = calib.call_kwargs[0]["context_length"]
        head_calib = BlockCalibration(hidden=[unpack(h, context)[1] for h in calib.hidden])
    _write_non_block(source, sink, model, method, head_calib, result)
    result.module_overrides = dict(method.overrides)
    return result


def _capture_denoising(source: SourceModel, model: nn.Module, tokens: torch.Tensor, denoising: tuple[str, int],
                       batch_size: int, device: torch.device) -> BlockCalibration:
    from .denoising_calibration import denoising_windows
    from .paired_walk import capture_denoising_inputs

    mode, seed = denoising
    windows = denoising_windows(tokens, source.config, seed=seed, mode=mode)
    return capture_denoising_inputs(model, windows, batch_size=batch_size, device=device)


def _paired(model: nn.Module, adapter, index: int) -> nn.Module:
    """Block ``index`` walked with layer ``index`` of the shared stack (their shared modules re-shared
    before each forward: a method may have replaced some of the block's)."""
    from .paired_walk import PairedLayer
    from .shared_stack_view import share_modules

    shared = model.get_submodule(adapter.shared_stack.layers)[index]
    return PairedLayer(shared, adapter.block_list(model)[index], share=share_modules)


def _record_linear(result: PipelineResult, source: SourceModel, name: str, qweight) -> None:
    # Sizes are the native format's, whatever the sink writes (the report compares formats on them).
    tensors = linear_tensors(qweight)
    out, inp = qweight.shape
    dtype = _source_dtype(source, f"{name}.weight", torch.float32)
    result.quantized_modules.append(name)
    result.linear_params += out * inp
    result.linear_bytes_original += out * inp * torch.empty((), dtype=dtype).element_size()
    result.linear_bytes_quantized += sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k != "bias" and k not in qweight.extra_tensors
    )


def _write_block(source, sink, block, prefix, qweights, result) -> None:
    written = set()
    for name, qweight in qweights.items():
        if qweight.bias is not None:
            dtype = _source_dtype(source, f"{name}.bias", qweight.bias.dtype)
            qweight.bias = qweight.bias.to(dtype)
        sink.add_linear(name, qweight)
        _record_linear(result, source, name, qweight)
        if qweight.input_transforms:
            result.module_transforms[name] = list(qweight.input_transforms)
        written.update({f"{name}.weight", f"{name}.bias"})
    for local, param in block.named_parameters():
        name = f"{prefix}.{local}"
        if name not in written:  # norms etc., possibly with scales folded in by the method
            sink.add_tensor(name, param.to(_source_dtype(source, name, param.dtype)))
    for local, buffer in block.named_buffers():
        name = f"{prefix}.{local}"
        # persistent buffers the source stores (a router's expert_bias); a quantized linear's own
        # buffers (its bias included) were written with it above
        if name not in written and source.has(name):
            sink.add_tensor(name, buffer.to(_source_dtype(source, name, buffer.dtype)))


def _write_non_block(source, sink, model, method, head_calib, result) -> None:
    """Embeddings, final norm and head; the head quantized by the method with ``--include-lm-head``
    (first: a method may fold a scale into the final norm)."""
    adapter = source.adapter
    head = adapter.lm_head
    quantize_head = method.config.include_lm_head
    qweight = None
    if quantize_head:
        if adapter.ties_embeddings(source.config_dict):
            raise ConfigError(
                "the LM head is tied to the input embeddings, so it cannot be quantized on its own",
                hint="drop --include-lm-head",
            )
        qweight = method.quantize_head(model.get_submodule(adapter.final_norm), model.get_submodule(head), head,
                                       head_calib)
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith(adapter.blocks + "."):
            continue
        if name.startswith(head + ".") and quantize_head:
            continue
        if source.has(name):  # a tied head is not stored separately, as in the source
            sink.add_tensor(name, param.to(_source_dtype(source, name, param.dtype)))
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name.startswith((adapter.blocks + ".", head + ".")):  # blocks and the head: written with them
            continue
        if source.has(name):  # persistent buffers the source stores
            sink.add_tensor(name, buffer.to(_source_dtype(source, name, buffer.dtype)))
    if qweight is not None:
        sink.add_linear(head, qweight)
        _record_linear(result, source, head, qweight)
        if qweight.input_transforms:
            result.module_transforms[head] = list(qweight.input_transforms)
    else:
        result.modules_not_converted.append(head)
