"""``qdlm-export bench``: kernel micro-benchmarks and one timed denoising step, as ratios to the
fastest dense path, with their spread over interleaved repetitions; ``--peers`` adds torchao."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import out
from .options import (
    EMBEDDED_DEFAULT,
    JsonResults,
    Revision,
    RunDevice,
    TrustCheckpointCode,
    examples,
    int_range,
)

EXAMPLES = examples(
    "qdlm-export bench                  # kernels + a denoising step of the embedded default, W4",
    "qdlm-export bench --no-step --peers --m 1,16 --shape 4096x4096   # ours against torchao",
    "qdlm-export bench llada-w4 --trust-remote-code --full --json",
)


def _token_counts(value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", value) or any(int(v) < 1 for v in value.split(",")):
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of token counts >= 1, e.g. 16,256")
    return [int(v) for v in value.split(",")]


def _shapes(values: Optional[list[str]]) -> Optional[list[tuple[int, int]]]:
    if not values:
        return None
    shapes = []
    for value in values:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise typer.BadParameter(f"{value!r} is not a GEMM shape KxN (in x out features), e.g. 4096x4096")
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def bench(
    checkpoint_name: Annotated[
        Optional[str],
        typer.Argument(metavar="CHECKPOINT", help="A quantized checkpoint folder or Hub id (owner/name) for the denoising-step benchmark [default: the embedded tiny LLaDA, RTN W4 g128].")
    ] = None,
    full: Annotated[bool, typer.Option("--full/--quick", help="Every dLLM GEMM shape and token count, or a quick subset.")] = False,
    kernels: Annotated[bool, typer.Option("--kernels/--no-kernels", help="Run the GEMM micro-benchmarks.")] = True,
    step: Annotated[bool, typer.Option("--step/--no-step", help="Time one full denoising step against the original model.")] = True,
    peers: Annotated[bool, typer.Option("--peers", help="Also time torchao's int4 weight-only and int8 dynamic linears on the same weights and inputs (needs torchao; skipped with a note otherwise).")] = False,
    token_counts: Annotated[Optional[str], typer.Option("--m", metavar="M,...", help="Kernel token counts, comma-separated [default: 16,256; --full: 16,256,1024,4096].")] = None,
    shapes: Annotated[Optional[list[str]], typer.Option("--shape", metavar="KxN", help="A kernel GEMM shape (in x out features); repeatable [default: the LLaDA-8B/Dream-7B shapes].")] = None,
    repetitions: Annotated[int, typer.Option(help="Interleaved repetitions; ratios are their median, with min-max spread.", callback=int_range(1))] = 5,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the timings [default: 1, stable on a shared machine].", callback=int_range(1))] = None,
    seqlen: Annotated[int, typer.Option(help="Sequence length of the denoising step (at least 1).", callback=int_range(1))] = 256,
    device: RunDevice = None,
    trust_remote_code: TrustCheckpointCode = False,
    revision: Revision = None,
    as_json: JsonResults = False,
) -> None:
    """Benchmark kernels at dLLM shapes and a full denoising step, as ratios to the fastest dense path (float32 or bfloat16 on CPU, bf16 or fp16 on CUDA) measured in the same run."""
    import tempfile

    m_values, gemm_shapes = _token_counts(token_counts), _shapes(shapes)
    if peers and not kernels:
        raise typer.BadParameter("--peers times torchao beside our kernels: drop --no-kernels", param_hint="--peers")
    result: dict = {}
    checkpoint: Optional[Path] = None
    if step and checkpoint_name is not None:
        from ..hub.download import local_checkpoint

        checkpoint = local_checkpoint(checkpoint_name, revision=revision)
    if step and checkpoint is not None:  # refuse untrusted code or a broken checkpoint before minutes of kernel timing
        from ..bench.model import check_checkpoint

        check_checkpoint(checkpoint, trust_remote_code)
    if kernels:
        from ..bench.kernels import format_report, run_kernel_benchmarks

        result["kernels"] = run_kernel_benchmarks(
            quick=not full, device=device, m_values=m_values, shapes=gemm_shapes, repeat=repetitions,
            threads=threads, peers=peers,
        )
        if peers:  # the peers' own top-level entry: null with the reason when torchao is missing
            result["peers"] = result["kernels"].pop("peers")
            if "peers_skipped" in result["kernels"]:
                result["peers_skipped"] = result["kernels"].pop("peers_skipped")
        if not as_json:
            out.print(format_report({**result["kernels"], **_peer_part(result)}), highlight=False, soft_wrap=True)
    if step:
        from ..bench.model import run_model_benchmark

        with tempfile.TemporaryDirectory() as tmp:
            target, trusted = checkpoint, trust_remote_code
            if target is None:
                from ..quantize.api import make_config
                from ..quantize.api import quantize as run_quantize

                target, trusted = Path(tmp) / "tiny-w4", True  # made here from our own shipped code
                run_quantize(str(EMBEDDED_DEFAULT), target, make_config("rtn"), trust_remote_code=True, verify=False)
            result["step"] = run_model_benchmark(
                target, seqlen=seqlen, device=device, trust_remote_code=trusted, repeat=repetitions, threads=threads
            )
        if not as_json:
            s = result["step"]
            spread = max(s["ratio_high"] - s["ratio"], s["ratio"] - s["ratio_low"])
            out.print(
                f"denoising step ({s['tokens']} tokens, {s['device']}): dense {s['dense_dtype']} {s['dense_step_ms']} ms "
                f"(fastest of {', '.join(f'{k} {v} ms' for k, v in s['dense_step_ms_by_dtype'].items())}), "
                f"{s['method']} W{s['bits']}{'A' + str(s['act_bits']) if s['act_bits'] else ''} in {s['quantized_dtype']} "
                f"{s['quantized_step_ms']} ms -> ratio {s['ratio']:.2f} ±{spread:.2f} (speedup {s['speedup']}x, "
                f"{s['repetitions']} repetitions); quantized linears hold {s['linear_memory_ratio']:.1%} of their bf16 bytes"
                + (f"; online Hadamard {s['hadamard_share']:.1%} of the step" if s["hadamard_share"] is not None else ""),
                highlight=False, soft_wrap=True,
            )
    if as_json:
        typer.echo(json.dumps(result, indent=2))


def _peer_part(result: dict) -> dict:
    return {k: result[k] for k in ("peers", "peers_skipped") if k in result}
