"""``qdlm-export bench``: kernel micro-benchmarks and one timed denoising step, as ratios to dense."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import out
from .options import EMBEDDED_DEFAULT, JsonResults, RunDevice, TrustCheckpointCode, examples, int_range

EXAMPLES = examples(
    "qdlm-export bench                  # kernels + a denoising step of the embedded default, W4",
    "qdlm-export bench llada-w4 --trust-remote-code --full --json",
)


def bench(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(metavar="CHECKPOINT", help="A quantized checkpoint for the denoising-step benchmark [default: the embedded tiny LLaDA, RTN W4 g128].")
    ] = None,
    full: Annotated[bool, typer.Option("--full/--quick", help="Every dLLM GEMM shape and token count, or a quick subset.")] = False,
    kernels: Annotated[bool, typer.Option("--kernels/--no-kernels", help="Run the GEMM micro-benchmarks.")] = True,
    step: Annotated[bool, typer.Option("--step/--no-step", help="Time one full denoising step against the original model.")] = True,
    seqlen: Annotated[int, typer.Option(help="Sequence length of the denoising step (at least 1).", callback=int_range(1))] = 256,
    device: RunDevice = None,
    trust_remote_code: TrustCheckpointCode = False,
    as_json: JsonResults = False,
) -> None:
    """Benchmark kernels at dLLM shapes and a full denoising step, as ratios to bf16 (fp32 on CPU) measured in the same run."""
    import tempfile

    result: dict = {}
    if step and checkpoint is not None:  # refuse untrusted code or a broken checkpoint before minutes of kernel timing
        from ..bench.model import check_checkpoint

        check_checkpoint(checkpoint, trust_remote_code)
    if kernels:
        from ..bench.kernels import format_report, run_kernel_benchmarks

        result["kernels"] = run_kernel_benchmarks(quick=not full, device=device)
        if not as_json:
            out.print(format_report(result["kernels"]), highlight=False, soft_wrap=True)
    if step:
        from ..bench.model import run_model_benchmark

        with tempfile.TemporaryDirectory() as tmp:
            target, trusted = checkpoint, trust_remote_code
            if target is None:
                from ..quantize.api import make_config
                from ..quantize.api import quantize as run_quantize

                target, trusted = Path(tmp) / "tiny-w4", True  # made here from our own shipped code
                run_quantize(str(EMBEDDED_DEFAULT), target, make_config("rtn"), trust_remote_code=True, verify=False)
            result["step"] = run_model_benchmark(target, seqlen=seqlen, device=device, trust_remote_code=trusted)
        if not as_json:
            s = result["step"]
            out.print(
                f"denoising step ({s['tokens']} tokens, {s['device']}): {s['dense_dtype']} {s['dense_step_ms']} ms, "
                f"{s['method']} W{s['bits']}{'A' + str(s['act_bits']) if s['act_bits'] else ''} {s['quantized_step_ms']} ms "
                f"-> speedup {s['speedup']}x; quantized linears hold {s['linear_memory_ratio']:.1%} of their bf16 bytes"
                + (f"; online Hadamard {s['hadamard_share']:.1%} of the step" if s["hadamard_share"] is not None else ""),
                highlight=False, soft_wrap=True,
            )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
