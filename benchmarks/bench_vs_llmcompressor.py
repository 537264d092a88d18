"""Our GPTQ beside llm-compressor's GPTQ, on the same Qwen2-family model and calibration tokens, on CPU.

llm-compressor pins an older transformers, so it runs from its own virtual environment:

    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    python benchmarks/bench_vs_llmcompressor.py --lc-python /tmp/lcvenv/bin/python [--json]

Both quantize W4 g128 symmetric, dampening 0.01, no activation ordering, LM head kept. Each runs in
its own process; each reports wall time for quantization alone and the logits of its quantized model
on held-out tokens. Errors are relative logits errors against the full-precision model, computed
here, so neither tool grades itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OURS = r"""
import sys, time, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.quantize.api import make_config, quantize
src, out, nsamples, seqlen, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
start = time.perf_counter()
quantize(src, out + "/q", make_config("gptq", bits=4, group_size=128, symmetric=True, damp=0.01),
         calibration=CalibrationConfig(nsamples=nsamples, seqlen=seqlen, seed=0), verify=False, device="cpu",
         compute_dtype="float32", batch_size=8)
seconds = time.perf_counter() - start
model = AutoModelForCausalLM.from_pretrained(out + "/q", dtype=torch.float32)
with torch.no_grad():
    logits = model(input_ids=load_file(out + "/eval.safetensors")["ids"]).logits
save_file({"logits": logits.contiguous(), "seconds": torch.tensor([seconds])}, out + "/ours.safetensors")
"""

THEIRS = r"""
import sys, time, torch
from safetensors.torch import load_file, save_file
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
src, out, nsamples, seqlen, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
ids = load_file(out + "/calib.safetensors")["ids"]
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01, actorder=None)
start = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=nsamples, max_seq_length=seqlen)
seconds = time.perf_counter() - start
with torch.no_grad():
    logits = model(input_ids=load_file(out + "/eval.safetensors")["ids"]).logits
save_file({"logits": logits.contiguous(), "seconds": torch.tensor([seconds])}, out + "/theirs.safetensors")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lc-python", required=True, help="python of a venv with llmcompressor installed")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from qdlm_export.quantize.calibration import calibration_tokens
    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.fixtures import tokenizer_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        torch.manual_seed(0)
        cfg = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                          num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 256),
                          vocab_size=len(tok), tie_word_embeddings=False)
        src = tmp / "src"
        Qwen2ForCausalLM(cfg).save_pretrained(src)
        tok.save_pretrained(src)
        calib = calibration_tokens(tok, CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen, seed=0))
        held = calibration_tokens(tok, CalibrationConfig(nsamples=8, seqlen=args.seqlen, seed=999))
        save_file({"ids": calib}, tmp / "calib.safetensors")
        save_file({"ids": held}, tmp / "eval.safetensors")
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(input_ids=held).logits

        rows = {}
        for name, python, code in (("qdlm-export", sys.executable, OURS), ("llm-compressor", args.lc_python, THEIRS)):
            started = time.perf_counter()
            subprocess.run([python, "-c", code, str(src), str(tmp), str(args.nsamples), str(args.seqlen), str(args.threads)],
                           check=True, capture_output=True, text=True)
            result = load_file(tmp / ("ours.safetensors" if name == "qdlm-export" else "theirs.safetensors"))
            err = ((result["logits"] - ref).norm() / ref.norm()).item()
            rows[name] = {"quantize_s": round(result["seconds"].item(), 1), "process_s": round(time.perf_counter() - started, 1),
                          "rel_logits_error": round(err, 5)}
    ours, theirs = rows["qdlm-export"], rows["llm-compressor"]
    summary = {
        "model": f"Qwen2 hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers (random init)",
        "calibration": f"{args.nsamples} x {args.seqlen} tokens", "threads": args.threads, "rows": rows,
        "time_ratio_ours_over_theirs": round(ours["quantize_s"] / theirs["quantize_s"], 3),
        "error_ratio_ours_over_theirs": round(ours["rel_logits_error"] / theirs["rel_logits_error"], 3),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['model']}; {summary['calibration']}; {args.threads} threads")
    for name, r in rows.items():
        print(f"{name:>15}: quantize {r['quantize_s']:>7} s   relative logits error {r['rel_logits_error']}")
    print(f"ours/theirs: time {summary['time_ratio_ours_over_theirs']}x, error {summary['error_ratio_ours_over_theirs']}x")


if __name__ == "__main__":
    main()
