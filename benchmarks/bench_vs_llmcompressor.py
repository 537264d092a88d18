"""Our GPTQ beside llm-compressor's GPTQ: same model, same calibration windows, each tool with its
*default* options for the scheme, on CPU.

llm-compressor pins its own transformers, so it runs from its own virtual environment:

    python3 -m venv /tmp/lc-venv
    /tmp/lc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    python benchmarks/bench_vs_llmcompressor.py --lc-python /tmp/lc-venv/bin/python \\
        --models qwen2-4x1024 llada8b-block --schemes w4-asym w3-asym w4-sym --calib 16x128 128x512 \\
        --repeats 3 [--json]

Models (random init, seed 0, saved once): ``qwen2-4x1024`` (Qwen2, 4 layers, hidden 1024, MLP 2816)
and ``llada8b-block`` (one decoder layer with LLaDA-8B's linear shapes: hidden 4096, MLP 12288, 32
heads, no GQA, as a Llama layer so that both tools load it without remote code). Schemes: W4 and W3,
group 128, asymmetric, and W4 g128 symmetric; the LM head is left in full precision by both.

Calibration is clean text for both (``masking="none"``: our default would mask the windows the dLLM
way, since the Qwen2 family carries Dream's mask token; an earlier version of this benchmark did so
for ours only). What is compared, per (model, scheme, calibration): each tool runs in a fresh process on the token
windows written by this script (ours checks that its own calibration draws the very same windows).
``quantize_s``/``quantize_cpu_s``: wall and CPU seconds of the quantization call alone (ours:
``quantize()`` to a folder, verification off; theirs: ``oneshot`` + ``save_pretrained`` compressed);
``process_s``: from the process's start to its quantized checkpoint on disk (imports and model
loading included: what a user waits for); ``peak_rss_gb``: the process's high-water mark at that
point. Then the quantized model's logits on 8 held-out windows, compared here with the float
model's (relative Frobenius error), so neither tool grades itself. Runs are interleaved (each
repetition runs every configuration, the two tools in alternating order) and reported as median
[min-max] over repetitions; CPU time is reported because the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SCHEMES = {"w4-asym": (4, False), "w3-asym": (3, False), "w4-sym": (4, True)}

CHILD_PRELUDE = r"""
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def peak_rss_gb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024**2
import torch
from safetensors.torch import load_file, save_file
src, work, bits, symmetric, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
torch.set_num_threads(threads)
ids = load_file(work + "/calib.safetensors")["ids"]
"""

OURS = CHILD_PRELUDE + r"""
from transformers import AutoModelForCausalLM, AutoTokenizer
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.quantize.calibration import calibration_tokens
calibration = CalibrationConfig(nsamples=ids.shape[0], seqlen=ids.shape[1], seed=0, masking="none")
wall, c0 = time.perf_counter(), cpu()
quantize(src, work + "/ours", make_config("gptq", bits=bits, group_size=128, symmetric=symmetric),
         calibration=calibration, verify=False, device="cpu", overwrite=True)
row = {"quantize_s": time.perf_counter() - wall, "quantize_cpu_s": cpu() - c0, "saved_at": time.time(),
       "peak_rss_gb": peak_rss_gb()}
# After the clock: the check that ours drew the very windows llm-compressor gets is not the user's wait.
assert torch.equal(calibration_tokens(AutoTokenizer.from_pretrained(src), calibration), ids), "windows differ"
model = AutoModelForCausalLM.from_pretrained(work + "/ours", dtype=torch.float32)
with torch.no_grad():
    logits = model(input_ids=load_file(work + "/eval.safetensors")["ids"]).logits
save_file({"logits": logits.contiguous()}, work + "/logits.safetensors")
print(json.dumps(row))
"""

THEIRS = CHILD_PRELUDE + r"""
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 128}
# Only the scheme is given: block size, dampening, activation order and observer stay llm-compressor's.
recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
wall, c0 = time.perf_counter(), cpu()
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
model.save_pretrained(work + "/theirs", save_compressed=True)
row = {"quantize_s": time.perf_counter() - wall, "quantize_cpu_s": cpu() - c0, "saved_at": time.time(),
       "peak_rss_gb": peak_rss_gb()}
with torch.no_grad():
    logits = model(input_ids=load_file(work + "/eval.safetensors")["ids"]).logits
save_file({"logits": logits.contiguous()}, work + "/logits.safetensors")
print(json.dumps(row))
"""


def build_model(kind: str, folder: Path, tokenizer) -> None:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "qwen2-4x1024":
        cfg = Qwen2Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=len(tokenizer), tie_word_embeddings=False)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "llada8b-block":
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=1, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=len(tokenizer), tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        raise SystemExit(f"unknown model {kind}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_child(python: str, code: str, src: Path, work: Path, bits: int, symmetric: bool, threads: int) -> dict:
    spawned = time.time()
    done = subprocess.run([python, "-c", code, str(src), str(work), str(bits), "1" if symmetric else "0", str(threads)],
                          check=False, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{python} failed:\n{done.stderr[-4000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_s"] = row.pop("saved_at") - spawned
    return row


def summarize(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lc-python", required=True, help="python of a venv with llmcompressor installed")
    parser.add_argument("--models", nargs="+", default=["qwen2-4x1024"])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--calib", nargs="+", default=["16x128"], help="NSAMPLESxSEQLEN, e.g. 16x128 128x512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.fixtures import tokenizer_dir
    from qdlm_export.quantize.calibration import calibration_tokens

    def CALIBRATION(nsamples, seqlen, seed):
        # (a Qwen2 config carries Dream's mask token, so "auto" masking would mask ours only)
        return CalibrationConfig(nsamples=nsamples, seqlen=seqlen, seed=seed, masking="none")

    tools = {"qdlm-export": (sys.executable, OURS), "llm-compressor": (args.lc_python, THEIRS)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        cases = []
        for model_kind in args.models:
            src = tmp / model_kind
            build_model(model_kind, src, tok)
            src_tok = AutoTokenizer.from_pretrained(src)  # what ours tokenizes with (a Qwen2Tokenizer here)
            for calib in args.calib:
                nsamples, seqlen = (int(v) for v in calib.split("x"))
                work = tmp / f"{model_kind}-{calib}"
                work.mkdir()
                save_file({"ids": calibration_tokens(src_tok, CALIBRATION(nsamples, seqlen, 0))},
                          work / "calib.safetensors")
                held = calibration_tokens(src_tok, CALIBRATION(8, min(seqlen, 256), 999))
                save_file({"ids": held}, work / "eval.safetensors")
                with torch.no_grad():
                    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(input_ids=held).logits
                for scheme in args.schemes:
                    cases.append({"model": model_kind, "calibration": calib, "scheme": scheme, "src": src, "work": work,
                                  "ref": ref, "runs": {name: [] for name in tools}})
        for rep in range(args.repeats):
            for i, case in enumerate(cases):
                order = list(tools) if (rep + i) % 2 == 0 else list(reversed(tools))
                bits, symmetric = SCHEMES[case["scheme"]]
                for name in order:
                    python, code = tools[name]
                    row = run_child(python, code, case["src"], case["work"], bits, symmetric, args.threads)
                    logits = load_file(case["work"] / "logits.safetensors")["logits"]
                    row["rel_logits_error"] = ((logits - case["ref"]).norm() / case["ref"].norm()).item()
                    case["runs"][name].append(row)
                    print(f"rep {rep} {case['model']} {case['calibration']} {case['scheme']} {name}: "
                          + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), file=sys.stderr, flush=True)
        for case in cases:
            summary = {name: {key: summarize([r[key] for r in runs]) for key in runs[0]}
                       for name, runs in case["runs"].items()}
            ours, theirs = summary["qdlm-export"], summary["llm-compressor"]
            results.append({
                "model": case["model"], "calibration": case["calibration"], "scheme": case["scheme"],
                "repeats": args.repeats, "threads": args.threads, "tools": summary,
                "ratios_ours_over_theirs": {key: round(ours[key]["median"] / theirs[key]["median"], 3)
                                            for key in ours if theirs[key]["median"]},
            })
    if args.json:
        print(json.dumps(results, indent=2))
        return
    keys = ("rel_logits_error", "quantize_s", "quantize_cpu_s", "process_s", "peak_rss_gb")
    print("model | calibration | scheme | tool | " + " | ".join(keys) + "  (median [min-max])")
    for r in results:
        for name, s in r["tools"].items():
            cells = " | ".join(f"{s[k]['median']:.4g} [{s[k]['min']:.4g}-{s[k]['max']:.4g}]" for k in keys)
            print(f"{r['model']} | {r['calibration']} | {r['scheme']} | {name} | {cells}")
        print(f"{'':>10} ours/theirs: " + ", ".join(f"{k} {v}" for k, v in r["ratios_ours_over_theirs"].items()))


if __name__ == "__main__":
    main()
