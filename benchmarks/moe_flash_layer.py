"""Peak memory and time of ``qdlm-export quantize`` on ONE LLaDA2.0-flash-shaped mixture-of-experts layer.

LLaDA2.0-flash (``llada2_moe``, ~100B parameters) is too large for a 24 GiB, 2-core machine, but the
pipeline quantizes one decoder layer at a time, so one layer with the real shapes tells the memory
and the time of the whole model. This script

1. writes a checkpoint folder of the tiny LLaDA2 stand-in architecture (qdlm_export/fixtures, the
   published code's module names and quirks) with the flash layer shapes (:data:`FLASH`), ONE
   sparse layer (``num_hidden_layers=1``, ``first_k_dense_replace=0``) and random bf16 weights, drawn
   directly in bf16 and written shard by shard (never the whole layer in float32 in this process);
   the vocabulary is the shipped tokenizer's 2048 tokens (embeddings and head are not the subject;
   their real size is given by arithmetic in the plan);
2. runs ``qdlm-export quantize`` on it in a child process per method (RTN W4 g128; GPTQ W4 g128 on
   ``--nsamples x --seqlen`` calibration tokens), ``OMP_NUM_THREADS`` threads, ``--no-verify``;
3. reports the child's peak RSS (its own ``VmHWM``, polled from /proc, with the anonymous and
   file-backed parts at the peak), the wall time, the seconds of the layer and per expert, the bf16
   bytes of the layer on disk and the packed bytes of its quantized tensors (GB = 10^9 bytes).

Before each run it checks ``MemAvailable`` against the expected need and refuses to start a run that
could push the machine into swap; while a run goes, a watchdog kills the child if ``MemAvailable``
falls under ``--min-available-gb`` (other jobs share the machine).

    python benchmarks/moe_flash_layer.py --dry-run                 # the plan, nothing built
    python benchmarks/moe_flash_layer.py --methods rtn gptq --json  # build, quantize, measure

The shapes come from the LLaDA2.0-flash config.json as inclusionAI's fine-tuning repository ships it
(:data:`FLASH_SOURCE`); docs/benchmarks.md ("LLaDA2.0-flash-shaped MoE layer") has the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

FLASH_SOURCE = ("github.com/inclusionAI/dFactory configs/model_configs/llada2_flash/config.json "
                "(commit c29d72cc5bdf946f374ce68dd305846f359ceb3c)")
STD = 0.02  # the published config's initializer_range
ROUTER_STD = 0.1  # as the tiny fixtures: routers decisive enough that rounding does not flip choices
NORM_JITTER = 0.1  # norm gains in [0.9, 1.1]
BYTES_BF16, BYTES_F32 = 2, 4


@dataclass(frozen=True)
class Shape:
    """The sizes that decide a LLaDA2 layer's tensors (config.json keys of the same names)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_shared_experts: int
    n_group: int
    topk_group: int
    # The rest describes the whole model, for the extrapolation (the built folder has one sparse layer).
    intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    vocab_size: int


FLASH = Shape(hidden_size=4096, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=256,
              num_experts_per_tok=8, moe_intermediate_size=1024, num_shared_experts=1, n_group=8, topk_group=4,
              intermediate_size=9216, num_hidden_layers=32, first_k_dense_replace=1, vocab_size=157184)


def sparse_layer_tensors(shape: Shape, prefix: str = "model.layers.0.") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of one sparse LLaDA2 layer, under the published names."""
    h, hd = shape.hidden_size, shape.head_dim
    t = {prefix + "input_layernorm.weight": (h,),
         prefix + "attention.query_key_value.weight": ((shape.num_attention_heads + 2 * shape.num_key_value_heads) * hd, h),
         prefix + "attention.query_layernorm.weight": (hd,),
         prefix + "attention.key_layernorm.weight": (hd,),
         prefix + "attention.dense.weight": (h, shape.num_attention_heads * hd),
         prefix + "post_attention_layernorm.weight": (h,),
         prefix + "mlp.gate.weight": (shape.num_experts, h),
         prefix + "mlp.gate.expert_bias": (shape.num_experts,)}
    experts = [(f"mlp.experts.{e}.", shape.moe_intermediate_size) for e in range(shape.num_experts)]
    if shape.num_shared_experts:
        experts.append(("mlp.shared_experts.", shape.moe_intermediate_size * shape.num_shared_experts))
    for sub, inter in experts:
        t[prefix + sub + "gate_proj.weight"] = (inter, h)
        t[prefix + sub + "up_proj.weight"] = (inter, h)
        t[prefix + sub + "down_proj.weight"] = (h, inter)
    return t


def dense_layer_params(shape: Shape) -> int:
    """Parameters of one dense LLaDA2 layer (the first ``first_k_dense_replace``): attention + MLP."""
    attn = sum(_numel(s) for n, s in sparse_layer_tensors(shape).items() if ".mlp." not in n)
    return attn + 3 * shape.hidden_size * shape.intermediate_size


def model_tensors(shape: Shape, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the one-layer checkpoint this script builds (``vocab`` rows of embeddings/head)."""
    t = {"model.word_embeddings.weight": (vocab, shape.hidden_size)}
    t.update(sparse_layer_tensors(shape))
    t["model.norm.weight"] = (shape.hidden_size,)
    t["lm_head.weight"] = (vocab, shape.hidden_size)
    return t


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def plan(shape: Shape, vocab: int) -> dict:
    """The arithmetic: sizes of the layer, of the built checkpoint and of the whole model."""
    layer = sparse_layer_tensors(shape)
    layer_params = sum(_numel(s) for s in layer.values())
    linear_params = sum(_numel(s) for n, s in layer.items()
                        if n.endswith(("_proj.weight", "query_key_value.weight", "attention.dense.weight")))
    expert_params = 3 * shape.hidden_size * shape.moe_intermediate_size
    sparse_layers = shape.num_hidden_layers - shape.first_k_dense_replace
    emb_real = shape.vocab_size * shape.hidden_size
    whole = (sparse_layers * layer_params + shape.first_k_dense_replace * dense_layer_params(shape)
             + 2 * emb_real + shape.hidden_size)
    gb = 1e9
    return {
        "shape": asdict(shape), "shape_source": FLASH_SOURCE if shape == FLASH else "custom",
        "built": {"num_hidden_layers": 1, "first_k_dense_replace": 0, "vocab_size": vocab, "dtype": "bfloat16",
                  "tensors": len(model_tensors(shape, vocab)),
                  "bytes": sum(_numel(s) for s in model_tensors(shape, vocab).values()) * BYTES_BF16},
        "layer_params": layer_params, "layer_linear_params": linear_params, "expert_params": expert_params,
        "layer_bf16_gb": layer_params * BYTES_BF16 / gb, "layer_float32_gb": layer_params * BYTES_F32 / gb,
        "real_embeddings_bf16_gb": emb_real * BYTES_BF16 / gb, "real_embeddings_float32_gb": emb_real * BYTES_F32 / gb,
        "whole_model_params": whole, "whole_model_bf16_gb": whole * BYTES_BF16 / gb,
        "sparse_layers": sparse_layers, "dense_layers": shape.first_k_dense_replace,
    }


# ---- building the folder -------------------------------------------------------------------------


def build_folder(out: Path, shape: Shape, *, seed: int = 0, shard_bytes: int = 2 * 10**9) -> Path:
    """A one-sparse-layer LLaDA2 checkpoint of ``shape`` in bf16: the tiny stand-in's folder (published
    code, tokenizer, config keys) with the config resized and the weights replaced, shard by shard."""
    import torch
    from safetensors.torch import save_file

    from qdlm_export.fixtures import build_tiny_moe_model

    # The stand-in's own folder at a tiny size gives the remote code, tokenizer and config keys.
    build_tiny_moe_model("llada2_moe", out, num_layers=1, hidden_size=64, num_heads=4, num_experts=8,
                         moe_intermediate_size=32, dtype=torch.bfloat16)
    (out / "model.safetensors").unlink()
    config = json.loads((out / "config.json").read_text())
    vocab = config["vocab_size"]  # the shipped tokenizer's
    sizes = asdict(shape)
    for key in ("intermediate_size", "num_hidden_layers", "first_k_dense_replace", "vocab_size"):
        sizes.pop(key)
    config.update(sizes, num_hidden_layers=1, first_k_dense_replace=0, max_window_layers=1)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    record = json.loads((out / "fixture.json").read_text())
    record.update(builder="benchmarks/moe_flash_layer.py", num_layers=1, **asdict(shape), built_vocab_size=vocab)
    (out / "fixture.json").write_text(json.dumps(record, indent=2) + "\n")

    tensors = model_tensors(shape, vocab)
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in tensors.items():
        nbytes = _numel(dims) * BYTES_BF16
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # Drawn directly in bf16: the largest thing alive is one shard of bf16 tensors.
        save_file({n: _draw(n, tensors[n], gen) for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(_numel(d) for d in tensors.values()) * BYTES_BF16},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _draw(name: str, dims: tuple[int, ...], gen):
    import torch

    t = torch.empty(dims, dtype=torch.bfloat16)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return t.uniform_(1 - NORM_JITTER, 1 + NORM_JITTER, generator=gen)
    if name.endswith("expert_bias"):
        return t.normal_(0.0, 0.05, generator=gen)  # trained routers carry non-zero biases
    return t.normal_(0.0, ROUTER_STD if name.endswith("mlp.gate.weight") else STD, generator=gen)


# ---- measuring -----------------------------------------------------------------------------------


def safetensors_bytes(folder: Path, prefix: str = "") -> int:
    """Data bytes of the tensors under ``prefix`` in every .safetensors file of ``folder`` (headers read
    directly, nothing loaded)."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k != "__metadata__" and k.startswith(prefix))
    return total


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return _kb_to_gb(kb)


def _kb_to_gb(kb: int) -> float:
    return kb * 1024 / 1e9  # GB = 10^9 bytes throughout, as the plan's sizes


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class Watch(threading.Thread):
    """Polls the child's memory: its VmHWM, the anonymous/file split at the largest RSS seen, a coarse
    timeline; kills it if the machine's MemAvailable drops under ``floor_gb``."""

    def __init__(self, proc: subprocess.Popen, floor_gb: float, period: float = 0.5):
        super().__init__(daemon=True)
        self.proc, self.floor_gb, self.period = proc, floor_gb, period
        self.hwm_kb, self.peak, self.peak_at_s = 0, {}, 0.0
        self.timeline: list[tuple[float, float]] = []
        self.killed = False
        self.started = time.perf_counter()

    def run(self) -> None:
        while self.proc.poll() is None:
            s = _status_kb(self.proc.pid)
            if s:
                self.hwm_kb = max(self.hwm_kb, s.get("VmHWM", 0))
                elapsed = time.perf_counter() - self.started
                if s.get("VmRSS", 0) >= self.peak.get("VmRSS", 0):
                    self.peak, self.peak_at_s = s, round(elapsed, 1)
                if not self.timeline or elapsed - self.timeline[-1][0] >= 5:
                    self.timeline.append((round(elapsed, 1), round(_kb_to_gb(s.get("VmRSS", 0)), 2)))
            if mem_available_gb() < self.floor_gb:
                self.killed = True
                self.proc.kill()
                return
            time.sleep(self.period)


def quantize_command(model: Path, out: Path, method: str, nsamples: int, seqlen: int, group_size: int = 128) -> list[str]:
    exe = shutil.which("qdlm-export", path=str(Path(sys.executable).parent)) or "qdlm-export"
    cmd = [exe, "quantize", str(model), "-o", str(out), "-m", method, "--bits", "4", "--group-size", str(group_size),
           "--trust-remote-code", "--no-verify", "--device", "cpu", "--json", "-q"]
    if method != "rtn":
        cmd += ["--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    return cmd


def needed_gb(p: dict) -> float:
    """Anonymous memory one run needs: the layer in float32 (the CPU compute dtype) plus ~2 GB of
    interpreter, torch, calibration activations and Hessians. The mapped bf16 pages come on top but
    are page cache the kernel can drop."""
    return p["layer_float32_gb"] + 2.0


def run_method(model: Path, out: Path, method: str, args, p: dict) -> dict:
    available = mem_available_gb()
    if available < needed_gb(p) + args.margin_gb:
        return {"method": method, "skipped": f"MemAvailable {available:.1f} GB < {needed_gb(p):.1f} GB needed "
                f"+ {args.margin_gb} GB margin"}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = quantize_command(model, out, method, args.nsamples, args.seqlen, args.group_size)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watch = Watch(proc, args.min_available_gb)
    watch.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - started
    watch.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the child: what other jobs on the machine take from the wall time, they do not add here.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"method": method, "mem_available_before_gb": round(available, 1), "wall_s": round(wall, 1),
           "cpu_s": round(cpu, 1), "load_average": [round(x, 1) for x in os.getloadavg()],
           "peak_rss_gb": round(_kb_to_gb(watch.hwm_kb), 2),
           "at_peak_anon_gb": round(_kb_to_gb(watch.peak.get("RssAnon", 0)), 2),
           "at_peak_file_gb": round(_kb_to_gb(watch.peak.get("RssFile", 0)), 2), "peak_at_s": watch.peak_at_s,
           "rss_timeline_s_gb": watch.timeline}
    if watch.killed or proc.returncode != 0:
        row["failed"] = "killed by the memory watchdog" if watch.killed else stderr.strip()[-2000:]
        return row
    report = json.loads((out / "qdlm_report.json").read_text())
    layer_s = report["seconds_per_block"][0]
    experts = p["shape"]["num_experts"] + (1 if p["shape"]["num_shared_experts"] else 0)
    row.update(layer_s=round(layer_s, 3), s_per_expert=round(layer_s / experts, 4), elapsed_s=report["elapsed_s"],
               layer_bf16_bytes=safetensors_bytes(model, "model.layers.0."),
               layer_packed_bytes=safetensors_bytes(out, "model.layers.0."),
               calibration=f"{args.nsamples}x{args.seqlen}" if method != "rtn" else None)
    row["packed_ratio"] = round(row["layer_packed_bytes"] / row["layer_bf16_bytes"], 4)
    return row


def extrapolate(p: dict, row: dict) -> dict:
    """The whole model from one layer: time scales with the layers (the dense first layer counted as a
    sparse one: an upper bound); peak memory stays one layer plus what is resident the whole run, the
    real-vocabulary embeddings and head (the built folder's are negligible). They are materialised in
    the skeleton's dtype, bf16 for this checkpoint (docs/benchmarks.md: the compute dtype finding);
    float32 if the CPU default of float32 took effect."""
    if "layer_s" not in row:
        return {}
    layers = p["shape"]["num_hidden_layers"]
    return {"whole_model_hours": round(layers * row["layer_s"] / 3600, 2),
            "whole_model_peak_rss_gb_estimate": round(row["peak_rss_gb"] + 2 * p["real_embeddings_bf16_gb"], 1),
            "whole_model_peak_rss_gb_if_float32": round(
                row["peak_rss_gb"] + p["layer_float32_gb"] - p["layer_bf16_gb"] + 2 * p["real_embeddings_float32_gb"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq", "awq"])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=128, help="W4 scale group (128: the measured runs)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the measured child")
    parser.add_argument("--workdir", type=Path, default=None, help="where the folders go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the built and quantized folders")
    parser.add_argument("--reuse", action="store_true", help="use the folder a --keep run left in --workdir")
    parser.add_argument("--margin-gb", type=float, default=3.0, help="MemAvailable to leave to other jobs")
    parser.add_argument("--min-available-gb", type=float, default=1.0, help="watchdog: kill the run below this")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; build and run nothing")
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=None, help=f"default: flash's {getattr(FLASH, field)}")
    args = parser.parse_args()

    shape = replace(FLASH, **{k: v for k, v in vars(args).items() if k in asdict(FLASH) and v is not None})
    p = plan(shape, vocab=_shipped_vocab())
    if args.dry_run:
        _print_plan(p, args)
        return
    root = args.workdir or Path(tempfile.mkdtemp(prefix="moe-flash-"))
    root.mkdir(parents=True, exist_ok=True)
    model = root / "layer"
    result = {"plan": p, "machine": _machine(), "threads": args.threads, "rows": []}
    try:
        started = time.perf_counter()
        if not (args.reuse and _built_with(model, shape)):
            shutil.rmtree(model, ignore_errors=True)
            build_folder(model, shape)
        result["build_s"] = round(time.perf_counter() - started, 1)
        for method in args.methods:
            row = run_method(model, root / f"q-{method}", method, args, p)
            row["extrapolation"] = extrapolate(p, row)
            result["rows"].append(row)
            if not args.json:
                print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(root / f"q-{method}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else f"build {result['build_s']} s, {result['machine']}")


def _built_with(model: Path, shape: Shape) -> bool:
    try:
        record = json.loads((model / "fixture.json").read_text())
        index = json.loads((model / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    files = set(index["weight_map"].values())
    complete = all((model / f).is_file() for f in files)
    return complete and all(record.get(k) == v for k, v in asdict(shape).items())


def _shipped_vocab() -> int:
    import importlib.util

    # The fixtures size the vocabulary to the shipped tokenizer: its largest id + 1. Found without
    # importing the package (and torch), so that --dry-run answers at once.
    package = Path(importlib.util.find_spec("qdlm_export").submodule_search_locations[0])
    data = json.loads((package / "assets" / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    return max(set(data["model"]["vocab"].values()) | {t["id"] for t in data["added_tokens"]}) + 1


def _machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs, {mem_available_gb():.1f} GB available at start"


def _print_plan(p: dict, args) -> None:
    s = p["shape"]
    print(f"plan: one LLaDA2 sparse layer, shapes from {p['shape_source']}")
    print(f"  hidden {s['hidden_size']}, heads {s['num_attention_heads']} (kv {s['num_key_value_heads']}, head_dim "
          f"{s['head_dim']}), experts {s['num_experts']} x moe_intermediate {s['moe_intermediate_size']} "
          f"(top {s['num_experts_per_tok']}, groups {s['n_group']}/{s['topk_group']}), shared {s['num_shared_experts']}")
    print(f"  built: {p['built']['tensors']} tensors, {p['built']['bytes'] / 1e9:.2f} GB bf16 "
          f"(vocab {p['built']['vocab_size']}, not the real {s['vocab_size']})")
    print(f"  layer: {p['layer_params']:,} params = {p['layer_bf16_gb']:.2f} GB bf16, "
          f"{p['layer_float32_gb']:.2f} GB float32; one expert {p['expert_params']:,} params")
    print(f"  real embeddings + head: 2 x {p['real_embeddings_bf16_gb']:.2f} GB bf16 "
          f"(2 x {p['real_embeddings_float32_gb']:.2f} GB float32)")
    print(f"  whole model: {p['whole_model_params'] / 1e9:.1f}B params = {p['whole_model_bf16_gb']:.1f} GB bf16 "
          f"({p['sparse_layers']} sparse + {p['dense_layers']} dense layers)")
    print(f"  each run needs ~{needed_gb(p):.1f} GB + {args.margin_gb} GB margin; available now "
          f"{mem_available_gb():.1f} GB")
    for method in args.methods:
        print(f"  {method}: OMP_NUM_THREADS={args.threads} " + " ".join(
            quantize_command(Path("LAYER"), Path(f"q-{method}"), method, args.nsamples, args.seqlen, args.group_size)))


if __name__ == "__main__":
    main()
