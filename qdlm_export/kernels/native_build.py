"""Building and loading the native kernels' C library (``native/int4_avx512bf16.c``).

The C file is compiled once per machine with the system C compiler (``$CC``, else ``cc``) into
``$QDLM_EXPORT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/qdlm-export`` or ``~/.cache/qdlm-export``),
named by a hash of the source, flags and compiler, staged and moved into place; about 2 s. A cache
folder that others can write is not trusted: the library is then built in a private temporary folder
for this process. Without a compiler, on another CPU, or with ``QDLM_EXPORT_NATIVE_KERNELS=0``,
:func:`build` says why. ``cpu_native`` keeps the loaded library (one per process).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("native") / "int4_avx512bf16.c"
FLAGS = ("-O3", "-fno-strict-aliasing", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fPIC", "-shared")
SWITCH = "QDLM_EXPORT_NATIVE_KERNELS"  # "0" turns the native kernels off
CACHE_ENV = "QDLM_EXPORT_CACHE_DIR"
BUILD_TIMEOUT_S = 120

# The C functions' signatures: argument types and result, p = pointer, i = int64, c = int, f = float, "" = void.
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "c": ctypes.c_int, "f": ctypes.c_float}
SIGNATURES = {
    "qdlm_cpu_supported": ("", "c"),
    "qdlm_int4_prepare_x": ("piiipp", ""),  # the fused kernel (few tokens, AVX-512)
    "qdlm_int4_gemm_tiles": ("ppiipiippipii", ""),
    "qdlm_bf16_pairs": ("piip", ""),  # the blocked kernel (many tokens)
    "qdlm_int4_gemm_blocked": ("piipiippipiip", ""),
    "qdlm_int4_blocked_mr": ("", "i"),
    "qdlm_int4_blocked_scratch": ("i", "i"),
    "qdlm_amx_ready": ("", "c"),  # AMX: the blocked kernel on tiles
    "qdlm_int4_amx_scratch": ("ii", "i"),
    "qdlm_int4_gemm_amx": ("piipiippipiip", ""),
    "qdlm_int4_amxi_x_words": ("ii", "i"),  # AMX: codes on the tiles (few tokens)
    "qdlm_int4_amxi_scratch": ("i", "i"),
    "qdlm_int4_amxi_prepare_x": ("piiipp", ""),
    "qdlm_int4_gemm_amxi": ("ppiipiippipiip", ""),
    "qdlm_amx_int8_ready": ("", "c"),  # cpu_int8.py
    "qdlm_int8_amx_scratch": ("ii", "i"),
    "qdlm_int8_gemm_amx": ("piipipppiip", ""),
    "qdlm_int4a_gemm_amx": ("piipipipppiip", ""),
    "qdlm_uint8_gemm_amx": ("piipiipppiip", ""),
    "qdlm_vnni_ready": ("", "c"),  # cpu_int8.py: W8A8 and W4A4 with few tokens on AVX512-VNNI
    "qdlm_int_gemm_vnni": ("piiipiipipppii", ""),
    "qdlm_quantize_rows_bf16": ("piiffpp", ""),
    "qdlm_quantize_rows_f32": ("piiffpp", ""),
    "qdlm_evict": ("pi", ""),  # bench: cold-weight timing
    "qdlm_fwht_rows_f32": ("pii", ""),  # cpu_hadamard.py
}


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qdlm-export" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_lacks_bf16() -> bool:
    """True when /proc/cpuinfo (Linux) lists CPU flags without avx512_bf16; False when unknown (the
    library's own check then decides after the build)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), None)
    return flags is not None and "avx512_bf16" not in flags.split()


def _trusted(path: Path) -> bool:
    """A file or folder we may load from: ours, and writable by nobody else (a library planted in a
    shared cache folder would run with our rights)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _compile(cc: str, folder: Path, target: Path) -> str | None:
    """Compile SOURCE into ``target`` (in ``folder``): staged under a temporary name and moved into
    place, so a concurrent build or a crash never leaves a half-written library under the final name.
    None, or why it failed."""
    staged = None
    try:
        fd, staged = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=folder)
        os.close(fd)
        done = subprocess.run([cc, *FLAGS, "-o", staged, str(SOURCE)], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            return f"building the native int4 kernel with {cc} failed: {first}"
        os.replace(staged, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"building the native int4 kernel with {cc} failed: {exc}"
    finally:
        if staged is not None and os.path.exists(staged):
            os.unlink(staged)


def build() -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded library, or None and why not: built (or found in the cache) and checked against
    this CPU."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"turned off by {SWITCH}={os.environ[SWITCH]}"
    if not SOURCE.is_file():  # e.g. this module as copied into a self-contained checkpoint: no C source
        return None, f"the native kernel's C source {SOURCE.name} is not installed beside {Path(__file__).name}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the native int4 kernel is for x86-64 CPUs with AVX512-BF16 (this is {platform.machine()})"
    if _cpu_lacks_bf16():  # before any compiler runs
        return None, "this CPU lacks AVX512-BF16 (the native int4 kernel needs avx512f/bw/vl and avx512_bf16)"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc) to build the native int4 kernel"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"the C compiler {cc} does not run ({exc})"
    digest = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, cc, version)).encode()).hexdigest()[:16]
    name = f"{SOURCE.stem}-{digest}.so"
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    private = None
    if not (_trusted(folder) and os.access(folder, os.W_OK)):
        # a cache we cannot write or should not trust: build for this process in a private folder
        try:
            folder = private = Path(tempfile.mkdtemp(prefix="qdlm-kernels-"))
        except OSError as exc:
            return None, f"no folder to build the native int4 kernel in ({exc})"
    target = folder / name
    try:
        if not (target.is_file() and _trusted(target)):
            reason = _compile(cc, folder, target)
            if reason:
                return None, reason
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            return None, f"loading the native int4 kernel {target.name} failed: {exc}"
    finally:
        if private is not None:  # loaded (or failed): the mapping outlives the file
            shutil.rmtree(private, ignore_errors=True)
    if not lib.qdlm_cpu_supported():
        return None, "this CPU lacks AVX512-BF16 (the native int4 kernel needs avx512f/bw/vl and avx512_bf16)"
    for symbol, (args, result) in SIGNATURES.items():
        fn = getattr(lib, symbol)
        fn.argtypes = [_CTYPES[c] for c in args]
        fn.restype = _CTYPES.get(result)
    return lib, None


