"""One full denoising step of a quantized checkpoint against its original, in the same run.

A dLLM denoising step is one forward pass over the whole sequence (prompt + masked answer). This
times that pass for the original model in every dense dtype the device runs fast (CPU: float32 and
bfloat16; CUDA: bfloat16 and float16) and for the quantized one, loaded in the dtype a short probe
found fastest, all in the same interleaved repetitions (``bench/timing.py``); the baseline is the
fastest dense model. It reports the memory the quantized linears hold against the same linears in
bf16 and, when the checkpoint has online Hadamard transforms, the share of the step spent in them.
All models are held at once (the dense ones in each dtype), so the step needs their memory together.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .timing import (
    DEFAULT_MIN_RUN_TIME,
    DEFAULT_REPETITIONS,
    clock_for,
    dense_dtypes,
    dtype_name,
    fastest,
    interleaved_times,
    median_ms,
    ratio_stats,
    sync,
    torch_threads,
)

# The package's own tiny LLaDA: its code is ours, so timing it never needs --trust-remote-code.
EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "assets" / "tiny-llada"


def _forward(model: nn.Module, tokens: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(input_ids=tokens)


def _time_forward(model: nn.Module, tokens: torch.Tensor, device: torch.device, repeat: int) -> float:
    """Median seconds of ``repeat`` forwards after one warm-up: the probe that picks the fastest dtype."""
    _forward(model, tokens)  # warm-up (kernel compilation, caches)
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        _forward(model, tokens)
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _load(
    folder: str, auto_class: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False
) -> nn.Module:
    import transformers
    from transformers.utils import logging as hf_logging

    from ..core.remote_code import refusal_from_transformers

    hf_logging.disable_progress_bar()
    cls = getattr(transformers, auto_class)
    try:
        model = cls.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as exc:
        refusal = refusal_from_transformers(exc, folder)
        if refusal is None:
            raise
        raise refusal from None
    return model.to(device).eval()


def _original_of(quantized_dir: Path) -> str:
    """The recorded original, found as ``eval`` finds it (the absolute path quantize saw, then the
    provenance source); a ``CheckpointError`` that says to pass it when it cannot be found."""
    from ..eval.checkpoint_files import original_of

    return original_of(quantized_dir)


def check_checkpoint(quantized_dir: str | Path, trust_remote_code: bool, original: str | Path | None = None) -> str:
    """Everything :func:`run_model_benchmark` needs before it loads anything, checked in seconds:
    the code it would run is trusted, the folder is a complete checkpoint (``inspect``'s validation:
    not a staging folder, every promised tensor present with its dtype and shape) and its original
    exists. Returns the original. ``bench`` calls it before minutes of kernel timing."""
    from ..eval.checkpoint_files import check_original
    from ..format.validation import validate_checkpoint

    check_trusted(quantized_dir, trust_remote_code, original)
    validate_checkpoint(Path(quantized_dir), require_qdlm=False)
    source = str(original) if original is not None else _original_of(Path(quantized_dir))
    check_original(source)
    return source


def check_trusted(quantized_dir: str | Path, trust_remote_code: bool, original: str | Path | None = None) -> None:
    """Refuse (naming the ``.py`` files) when timing ``quantized_dir`` or its original would run code
    shipped in their folders and ``trust_remote_code`` is False. The package's own embedded default
    is always allowed."""
    from ..errors import QdlmError
    from ..core.remote_code import require_trust

    if trust_remote_code:
        return
    quantized_dir = Path(quantized_dir)
    require_trust(quantized_dir, False, what="the checkpoint")
    try:
        source = str(original) if original is not None else _original_of(quantized_dir)
    except (OSError, ValueError, KeyError, TypeError, QdlmError):
        return  # no readable provenance: run_model_benchmark reports that itself
    if Path(source).expanduser().resolve() != EMBEDDED_DEFAULT.resolve():
        require_trust(source, False, what="its original model")


def linear_memory(model: nn.Module) -> tuple[int, int]:
    """(bytes held by quantized linears, bytes the same linears take as dense bf16 weights)."""
    from ..loader.hf_quantizer import QdlmLinear

    held = dense = 0
    for module in model.modules():
        if isinstance(module, QdlmLinear):
            held += sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n != "bias")
            dense += module.in_features * module.out_features * 2
    return held, dense


def run_model_benchmark(
    quantized_dir: str | Path,
    *,
    original: str | Path | None = None,
    batch: int = 1,
    seqlen: int = 256,
    repeat: int = DEFAULT_REPETITIONS,
    min_run_time: float = DEFAULT_MIN_RUN_TIME,
    threads: int | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Time one denoising step of ``quantized_dir`` and of its original (``repeat`` interleaved
    repetitions; ``threads`` on a CPU, default 1). Loading either may run Python code shipped in its
    folder (LLaDA, Dream): that needs ``trust_remote_code=True``, else ``UnsupportedModelError``
    names the files."""
    from ..core.arguments import check_device
    from ..eval.loading import auto_class_name

    if device is not None:
        device = check_device(device, allow_auto=False)
    quantized_dir = Path(quantized_dir)
    original = check_checkpoint(quantized_dir, trust_remote_code, original)
    config = json.loads((quantized_dir / "config.json").read_text())
    qconfig = config["quantization_config"]
    auto_class = auto_class_name(config)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocab = config.get("vocab_size") or config.get("embedding_size")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seqlen), generator=gen)
    mask_id = (qconfig.get("dllm") or {}).get("mask_token_id")
    if mask_id is not None:  # a mid-denoising sequence: the second half is still masked
        tokens[:, seqlen // 2 :] = mask_id
    tokens = tokens.to(dev)

    trusted = trust_remote_code or Path(original).expanduser().resolve() == EMBEDDED_DEFAULT.resolve()
    if threads is None and dev.type == "cpu":
        threads = 1
    with torch_threads(threads if dev.type == "cpu" else None) as used_threads:
        dense = {dt: _load(original, auto_class, dt, dev, trusted) for dt in dense_dtypes(dev)}
        probe = {dt: _time_forward(model, tokens, dev, 1) for dt, model in dense.items()}
        dtype = min(probe, key=probe.get)
        quant_model = _load(str(quantized_dir), auto_class, dtype, dev, trust_remote_code)
        fns = {f"dense:{dtype_name(dt)}": functools.partial(_forward, m, tokens) for dt, m in dense.items()}
        fns["quantized"] = functools.partial(_forward, quant_model, tokens)
        clock, clock_name = clock_for(dev, used_threads)
        times = interleaved_times(fns, dev, repetitions=repeat, min_run_time=min_run_time, clock=clock)
        del dense, fns
        dense_names = [name for name in times if name.startswith("dense:")]
        base = fastest(times, dense_names)
        stats = ratio_stats(times["quantized"], times[base])
        quant_ms = median_ms(times["quantized"])
        held, dense_bytes = linear_memory(quant_model)
        hadamard_share = _hadamard_share(quant_model, tokens, dev, quant_ms / 1000)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": used_threads if dev.type == "cpu" else None,
        "clock": clock_name,
        "checkpoint": str(quantized_dir),
        "method": qconfig.get("method"),
        "bits": qconfig["weights"]["bits"],
        "act_bits": (qconfig.get("activations") or {}).get("bits"),
        "tokens": batch * seqlen,
        "dense_dtype": base.split(":", 1)[1],
        "quantized_dtype": dtype_name(dtype),
        "dense_step_ms": round(median_ms(times[base]), 3),
        "dense_step_ms_by_dtype": {name.split(":", 1)[1]: round(median_ms(times[name]), 3) for name in dense_names},
        "quantized_step_ms": round(quant_ms, 3),
        "ratio": stats["median"],
        "ratio_low": stats["low"],
        "ratio_high": stats["high"],
        "repetitions": stats["repetitions"],
        "speedup": round(1 / stats["median"], 3),
        "linear_bytes_quantized": held,
        "linear_bytes_bf16": dense_bytes,
        "linear_memory_ratio": round(held / max(dense_bytes, 1), 4),
        "hadamard_share": hadamard_share,
    }


def _hadamard_share(model: nn.Module, tokens: torch.Tensor, device: torch.device, step_s: float) -> float | None:
    """Fraction of one step spent in online Hadamard transforms (None when the model has none)."""
    try:
        from ..core import transforms
    except ImportError:
        return None
    original = getattr(transforms, "hadamard_transform", None)
    if original is None:
        return None
    spent = [0.0]
    calls = [0]

    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync(device)
        spent[0] += time.perf_counter() - start
        calls[0] += 1
        return out

    transforms.hadamard_transform = timed
    try:
        with torch.no_grad():
            model(input_ids=tokens)
    finally:
        transforms.hadamard_transform = original
    return round(spent[0] / step_s, 4) if calls[0] else None
