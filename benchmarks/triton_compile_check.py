"""Compile this tree's Triton kernels for a CUDA GPU on any machine: no GPU, no interpreter.

    python benchmarks/triton_compile_check.py [--arch 90 80 89 100 120] [--parts defaults sweep] [--sass] [--json]

Triton compiles ahead of time for a named target with its own LLVM and ptxas, so what a GPU session
would build can be built, and inspected, here first. The Triton interpreter the kernel tests run in
accepts programs the compiler rejects (helpers returning different shapes per constexpr branch,
say), and knows nothing of shared memory or registers.

The real launchers run on CPU tensors at LLaDA-8B / Dream / LLaDA-MoE shapes, as a loaded model
calls them, and each launch is compiled for the target instead of being run; the tile sweep's
candidates (``triton_sweep.py``) are compiled as well (``--parts``). For every distinct
kernel (its constexprs and launch options) the report gives shared memory, registers and spills
(``ptxas -v``), the MMA instruction (``wgmma`` on Hopper, ``tcgen05`` on datacenter Blackwell,
``mma.sync`` otherwise), the global loads Triton's pipeliner left synchronous inside a loop (each
iteration then waits on memory), and with ``--sass`` the machine code's instruction mix, over the
whole kernel and over one iteration of its main loop. A kernel that
does not compile, or needs more shared memory than the target gives a block, is a failure; exit
status 1 when there is one, 3 when this Triton cannot compile for CUDA here, 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's qdlm_export first

# the MMA instruction in the PTX: Blackwell's tensor-core MMA, Hopper's warp-group one, the classic one
MMAS = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))
# compute capability -> (GPUs, shared memory a block may opt into, bytes)
ARCHS = {90: ("H100 / H200", 232448), 80: ("A100", 166912), 89: ("L40S / RTX 4090", 101376), 100: ("B200", 232448),
         120: ("RTX 5090", 101376)}
SHAPES = ((4096, 4096), (4096, 12288), (12288, 4096))  # K x N: LLaDA-8B's attention, up/gate, down
TOKENS = (1, 16, 32, 64, 256, 1024, 4096)


def _constexprs(fn, constexprs: dict) -> dict:
    """The kernel's own constexpr parameters (upper-case names), not Triton's specializations."""
    named = {fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    return {k: v for k, v in named.items() if k.isupper()}


class Compiler:
    """Stands in for ``JITFunction.run``: compiles each launch for ``arch`` and records it, once per
    distinct kernel. ``origin`` names the launch being made ("default" or "sweep")."""

    def __init__(self, arch: int, sass: bool = False):
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend

        self.arch, self.shared_limit = arch, ARCHS[arch][1]
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self._compile, self._source = triton.compile, ASTSource
        self.knobs = ((knobs.nvidia, "dump_ptxas_log", True),  # ptxas always runs with -v; this prints its log
                      (knobs.compilation, "always_compile", True))  # a cached kernel would skip ptxas
        self.rows: list[dict] = []
        self.origin = "default"
        self.raised = False  # the last launch's compile failed (and is recorded)
        self.sass = sass
        self._seen: dict[tuple, dict] = {}

    def run(self, fn, args, kwargs) -> None:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        key = (fn.__name__, str(signature), str(sorted(map(str, constexprs.items()))), str(options), str(attrs))
        if key in self._seen:
            self._seen[key]["origins"].add(self.origin)
            return
        row = dict(kernel=fn.__name__, arch=self.arch, constexprs=_constexprs(fn, constexprs),
                   num_warps=options.num_warps, num_stages=options.num_stages, origins={self.origin})
        self._seen[key] = row
        self.rows.append(row)
        log = io.StringIO()
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                kernel = self._compile(self._source(fn, signature, constexprs, attrs), target=self.target,
                                       options=options.__dict__)
        except Exception as exc:  # noqa: BLE001 - recorded; the launcher's own fallback, if any, then runs
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            row["error"] = f"{type(cause).__name__}: {str(cause).strip()[-400:]}"
            self.raised = True
            raise
        finally:
            row["compile_s"] = round(time.perf_counter() - started, 2)
        ptx, text = kernel.asm["ptx"], log.getvalue()
        regs = re.search(r"Used (\d+) registers", text)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        row.update(shared=int(kernel.metadata.shared), registers=int(regs.group(1)) if regs else None,
                   spill_bytes=sum(map(int, spills.groups())) if spills else None,
                   mma=next((name for name, text in MMAS if text in ptx), "none"),
                   loop_loads=loads_in_loops(kernel.asm["ttgir"]))
        if row["shared"] > self.shared_limit:
            row["error"] = f"needs {row['shared']} bytes of shared memory, sm_{self.arch} gives a block {self.shared_limit}"
        if self.sass:
            row["sass"], row["loop_sass"] = sass_counts(kernel.asm["cubin"])


# SASS instruction classes counted by --sass (static counts over the whole kernel, and over one iteration
# of its main loop): the MMAs (Hopper's warp-group ones are HGMMA for floats, IGMMA for int8), int ->
# float and float -> 16-bit conversions, shared-memory traffic, float FMAs, global loads to registers
# (LDG) and asynchronous global-to-shared copies (LDGSTS).
SASS_CLASSES = {"HGMMA": "HGMMA", "IGMMA": "IGMMA", "HMMA": "HMMA", "IMMA": "IMMA", "I2F": "I2F",
                "I2FP": "I2F", "F2FP": "F2FP", "STS": "STS", "LDS": "LDS", "LDSM": "LDS", "FFMA": "FFMA",
                "FMUL": "FMUL", "LDG": "LDG", "LDGSTS": "LDGSTS"}


def loads_in_loops(ttgir: str) -> int:
    """Global loads left synchronous inside the kernel's loops after Triton's software pipeliner.

    The pipeliner turns a loop's loads into asynchronous copies issued stages ahead
    (``ttg.async_copy_global_to_local``); a load it could not (under 4 contiguous bytes a thread, say)
    stays a ``tt.load``, and every iteration waits for its round trip to memory before the MMA."""
    stack, count = [], 0
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            stack and stack.pop()
        if "tt.load " in text and "for" in stack:
            count += 1
        if text.endswith("{"):
            stack.append("for" if "scf.for" in text else "other")
    return count


def sass_counts(cubin: bytes) -> tuple[dict, dict]:
    """Instruction classes of a cubin's SASS (cuobjdump, bundled with Triton): over the whole kernel,
    and over the body of its main loop (the longest backward branch around an MMA: one K step)."""
    import subprocess
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True).stdout
    code = [(int(addr, 16), op, rest) for addr, op, rest in
            re.findall(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", text, re.M)]
    loops = [(int(target.group(1), 16), addr) for addr, op, rest in code
             if op == "BRA" and (target := re.search(r"0x([0-9a-f]+)", rest)) and int(target.group(1), 16) < addr]
    mma = {"HGMMA", "IGMMA", "HMMA", "IMMA", "UTCHMMA", "UTCIMMA", "UTCQMMA"}
    loops = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and op in mma for a, op, _ in code)]
    main = max(loops, key=lambda r: r[1] - r[0], default=None)

    def classes(ops) -> dict:
        counts = {"total": 0}
        for op in ops:
            counts["total"] += 1
            cls = SASS_CLASSES.get(op)
            if cls:
                counts[cls] = counts.get(cls, 0) + 1
        return counts

    return classes(op for _, op, _ in code), classes(op for a, op, _ in code if main and main[0] <= a <= main[1])


@contextlib.contextmanager
def compiling_for(arch: int, sass: bool = False):
    """Launches of Triton kernels compile for ``arch`` instead of running (yields the Compiler)."""
    from triton.runtime.jit import JITFunction

    from qdlm_export.kernels import grouped_experts_triton, hadamard_triton, int8_triton, weight_only_triton

    compiler = Compiler(arch, sass)
    # what the launchers ask of the GPU they run on, answered for the target
    patches = [(JITFunction, "run", lambda fn, *args, grid, warmup, **kwargs: compiler.run(fn, args, kwargs)),
               (int8_triton, "_large_shared_memory", lambda: compiler.shared_limit >= 200 * 1024),
               (hadamard_triton, "FUSED_FAILED", {}), *compiler.knobs]  # fallbacks remembered per target
    for module in (grouped_experts_triton, hadamard_triton, int8_triton, weight_only_triton):
        if hasattr(module, "cuda_arch"):
            patches.append((module, "cuda_arch", lambda device=None: arch))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield compiler
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _attempt(compiler: Compiler, call) -> None:
    """A launch whose compile failed is already recorded, and the next case still runs; a launcher that
    failed before any compile is recorded as a failure of its own."""
    compiler.raised = False
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        if not compiler.raised:
            compiler.rows.append(dict(kernel="(launcher)", arch=compiler.arch, constexprs={}, num_warps=0,
                                      num_stages=0, origins={compiler.origin}, error=f"{type(exc).__name__}: {exc}"))


def _empty(*shape, dtype):
    """Launch arguments: nothing runs, so only shapes, dtypes and strides matter (no values, no time)."""
    import torch

    return torch.empty(*shape, dtype=dtype)


def _weight(n, k, bits, group, symmetric, experts=None):
    """A packed weight as a checkpoint holds it: int32 words, scales, zero points (None if symmetric)."""
    import torch

    from qdlm_export.core.packing import packed_words

    lead = (experts,) if experts else ()
    groups = 1 if group == -1 else k // group
    zero = None if symmetric else _empty(*lead, n, groups, dtype=torch.uint8)
    return _empty(*lead, n, packed_words(k, bits), dtype=torch.int32), _empty(*lead, n, groups, dtype=torch.bfloat16), zero


def launch_defaults(compiler: Compiler) -> None:
    """Every launcher as a loaded model calls it, at the shapes and token counts above."""
    import torch

    from qdlm_export.kernels import (grouped_experts_triton, hadamard_triton, int8_triton, weight_only_dequant_triton,
                                     weight_only_triton)

    compiler.origin = "default"
    weight_schemes = ((4, 128, False), (4, 128, True), (8, -1, True), (2, 128, False), (3, 128, False), (8, 128, False))
    for k, n in SHAPES:
        for bits, group, symmetric in weight_schemes:
            wp, ws, wz = _weight(n, k, bits, group, symmetric)
            dtypes = (torch.bfloat16, torch.float16) if (bits, group, symmetric) == (4, 128, False) else (torch.bfloat16,)
            for m in TOKENS:
                for dtype in dtypes:
                    x = _empty(m, k, dtype=dtype)
                    _attempt(compiler, lambda: weight_only_triton.weight_only_linear_triton(x, wp, ws, wz, bits, group, k))
            _attempt(compiler, lambda: weight_only_dequant_triton.dequantize_packed_triton(wp, ws, wz, bits, group, k, torch.bfloat16))
        for bits, group, symmetric in ((8, -1, True), (4, 128, True), (4, -1, True), (4, 128, False)):
            wp, ws, wz = _weight(n, k, bits, group, symmetric)
            ws = ws.float()
            for m in TOKENS:
                for dtype in (torch.bfloat16, torch.float32):  # float32 rows: after online transforms
                    x = _empty(m, k, dtype=dtype)
                    _attempt(compiler, lambda: int8_triton.quantize_per_token_triton(x, bits=8 if bits == 8 else 4))
                xq, xs = _empty(m, k, dtype=torch.int8), _empty(m, 1, dtype=torch.float32)
                _attempt(compiler, lambda: int8_triton.packed_int_linear_triton(xq, xs, wp, ws, wz, bits, group, k))
                if bits == 8:
                    w8 = _empty(n, k, dtype=torch.int8)
                    _attempt(compiler, lambda: int8_triton.int8_gemm_triton(xq, xs, w8, ws.reshape(n, 1)))
    for n in (4096, 11008, 12288, 14336, 18944):  # hidden and MLP sizes of LLaDA, LLaMA-likes, Dream
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = _empty(64, n, dtype=dtype)
            _attempt(compiler, lambda: hadamard_triton.hadamard_triton(x))
    for experts, k, n, rows in ((64, 2048, 1024, 64 * 8), (64, 2048, 1024, 4096 * 8), (256, 4096, 1536, 256 * 8)):
        offsets = torch.arange(0, rows + 1, rows // experts)  # the rows split evenly between the experts
        x = _empty(rows, k, dtype=torch.bfloat16)
        for symmetric in (False, True):
            wp, ws, wz = _weight(n, k, 4, 128, symmetric, experts)
            _attempt(compiler, lambda: grouped_experts_triton.grouped_expert_gemm_triton(x, offsets, wp, ws, wz, 4, 128, k))


def launch_sweep(compiler: Compiler) -> None:
    """The tile sweep's candidates, as ``triton_sweep.py`` launches them on a GPU (its weights: W4 g128
    and per-channel W8 / W4 codes, symmetric)."""
    import torch

    import triton_sweep
    from qdlm_export.kernels import int8_triton, weight_only_triton

    compiler.origin = "sweep"
    k, n = SHAPES[1]
    (wp, ws, _), (w8p, w8s, _), (w4p, w4s, _) = (_weight(n, k, 4, 128, True), _weight(n, k, 8, -1, True),
                                                 _weight(n, k, 4, -1, True))
    for m in (16, 256, 1024):
        cls = triton_sweep.m_class(m)
        x = _empty(m, k, dtype=torch.bfloat16)
        xq, xs = _empty(m, k, dtype=torch.int8), _empty(m, 1, dtype=torch.float32)
        for c in triton_sweep.WO[cls]:
            _attempt(compiler, lambda: weight_only_triton.weight_only_linear_triton(x, wp, ws, None, 4, 128, k,
                                                                          config=triton_sweep.as_config(c)))
        for c in triton_sweep.INT8[cls]:
            cfg = triton_sweep.as_config(c)
            _attempt(compiler, lambda: int8_triton.packed_int_linear_triton(xq, xs, w8p, w8s.float(), None, 8, -1, k, config=cfg))
            _attempt(compiler, lambda: int8_triton.packed_int_linear_triton(xq, xs, w4p, w4s.float(), None, 4, -1, k, config=cfg))


PARTS = {"defaults": launch_defaults, "sweep": launch_sweep}


def unsupported_reason() -> str | None:
    """None when this Triton can compile for CUDA here the way this script drives it, else why not."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        get_ptxas(90).path  # noqa: B018 - raises without the bundled ptxas
    except Exception as exc:  # noqa: BLE001
        return f"this Triton cannot compile for CUDA here ({type(exc).__name__}: {exc})"
    if not hasattr(JITFunction, "_pack_args"):
        return "this Triton's JITFunction has no _pack_args (the script drives triton 3.9's launch path)"
    return None


def check(archs: list[int], parts: list[str], sass: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("triton_compile_check.py compiles for a GPU: unset TRITON_INTERPRET")
    rows = []
    for arch in archs:
        with compiling_for(arch, sass) as compiler:
            for part in parts:
                PARTS[part](compiler)
        rows += compiler.rows
    for row in rows:
        row["origins"] = sorted(row["origins"])
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| sm | kernel | constexprs | warps / stages | shared KiB | registers | spills (B) | MMA | loads in loop "
             "| from | result |", "|---|---|---|---|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        shared = f"{r['shared'] / 1024:.0f}" if "shared" in r else ""
        lines.append(f"| {r['arch']} | {r['kernel']} | {consts} | {r['num_warps']} / {r['num_stages']} | {shared} | "
                     f"{r.get('registers') or ''} | {r.get('spill_bytes', '')} | {r.get('mma', '')} | "
                     f"{r.get('loop_loads', '')} | {'+'.join(r['origins'])} | {r.get('error', 'ok')[:120]} |"
                     + "".join(f" {' '.join(f'{k}={v}' for k, v in r[part].items())} |"
                               for part in ("sass", "loop_sass") if part in r))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", type=int, default=[90], choices=sorted(ARCHS))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS),
                        help="defaults: what a loaded model launches; sweep: the tile sweep's candidates")
    parser.add_argument("--sass", action="store_true", help="count SASS instruction classes (cuobjdump)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_sweep
    reason = unsupported_reason()
    if reason:
        print(f"triton_compile_check.py: {reason}", file=sys.stderr)
        return 3
    rows = check(args.arch, args.parts, args.sass)
    failed = [r for r in rows if "error" in r]
    if args.json:
        print(json.dumps({"archs": {a: ARCHS[a][0] for a in args.arch}, "rows": rows}, indent=1))
    else:
        print("\n".join(table(rows)))
        print(f"\n{len(rows)} kernels compiled for sm_{'/'.join(map(str, args.arch))}, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
