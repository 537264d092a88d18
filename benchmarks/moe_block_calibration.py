"""Block-diffusion calibration for LLaDA2, measured: which attention pattern to calibrate with.

On the tiny LLaDA2 stand-in of the published code (``llada2_moe``, qdlm_export/fixtures/published/;
*random weights*, router biases on: no trained tiny LLaDA2 exists), GPTQ and AWQ at W3 and W4 (group
32), calibrate on windows of the shipped corpus' training part with

* ``block-causal``: the default (``--calib-attention auto``): attention bidirectional inside blocks of
  32 and causal across them; a random current block b partly masked (t ~ U(0,1]), the blocks before
  it clean, the blocks after it all mask tokens (invisible to the earlier ones);
* ``block-causal, b last``: the same, with the current block always the window's last (no masked
  blocks after it: the published ``generate`` leaves them out of its forward), a variant measured here only;
* ``causal, clean``: a token-causal mask on clean text, what autoregressive calibrators (GPTQModel)
  do (``--calib-attention causal --calib-masking none``);
* ``full, masked``: bidirectional attention over the whole window with per-token masking at a ratio
  t ~ U(0,1) (the behaviour before this option: ``--calib-attention full``),

each block quantized in memory as the pipeline drives it (inputs captured with the mask, propagated
through the quantized blocks), three calibration seeds. Held-out error is measured the way the model
runs: windows of the corpus' held-out tail cut as the published sampler's forward sees them (blocks
0..b, block b partly masked, block-causal mask); the error is the relative error of the logits of
block b (what the sampler reads) against the float model's, and the KL divergence from the float
model's distribution at block b's masked positions (what it samples from). Lower is better.

    python benchmarks/moe_block_calibration.py [--seeds 3] [--nsamples 32] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("block-causal", "block-causal, b last", "causal, clean", "full, masked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="calibration seeds per setting")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--windows", type=int, default=64, help="held-out windows")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qdlm_export.eval.likelihood import corpus_split, heldout_tokens
    from qdlm_export.fixtures import MASK_ID, build_tiny_moe_model, tokenizer_dir

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    block = 32
    held = held_out_steps(heldout_tokens(tokenizer, args.windows, args.seqlen, seed=12345), block, MASK_ID)
    rows, wins = [], dict.fromkeys(VARIANTS, 0)
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.txt"
        train.write_text(corpus_split()[0])
        source = build_tiny_moe_model("llada2_moe", Path(tmp) / "llada2_moe", router_bias=True)
        original = load(source)
        calibrations = {(variant, seed): calibration(tokenizer, train, variant, seed, args, block, MASK_ID)
                        for variant in VARIANTS for seed in range(args.seeds)}
        for method in ("gptq", "awq"):
            for bits in args.bits:
                errors, kls = {}, {}
                for variant in VARIANTS:
                    scores = [score(original, quantized(original, method, bits, *calibrations[variant, seed]), held)
                              for seed in range(args.seeds)]
                    errors[variant] = [s[0] for s in scores]
                    kls[variant] = [s[1] for s in scores]
                best = min(VARIANTS, key=lambda v: statistics.mean(errors[v]))
                wins[best] += 1
                cells = " | ".join(
                    ("**{}**" if v == best else "{}").format(
                        f"{statistics.mean(errors[v]):.4f} ± {spread(errors[v]):.4f} ({statistics.mean(kls[v]):.5f})")
                    for v in VARIANTS)
                rows.append(f"| {method} | W{bits} | {cells} |")
                print(rows[-1], flush=True)
    print()
    print("| method | bits | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    print("\n".join(rows))
    print()
    print("lowest mean logit error per setting: " + ", ".join(f"{v} {n}" for v, n in wins.items()))
    print(f"{time.time() - started:.0f} s on {platform.machine()}, 1 thread, CPU; torch {torch.__version__}")


def spread(values: list[float]) -> float:
    """The standard deviation over calibration seeds (0 with one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def load(folder: Path):
    import transformers

    from qdlm_export.families import family_by_name
    from qdlm_export.quantize.fidelity import prepare_folder_code

    auto = family_by_name("llada2_moe").auto_class
    prepare_folder_code(folder, auto)
    return getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def calibration(tokenizer, train: Path, variant: str, seed: int, args, block: int, mask_id: int):
    """(tokens, additive mask) of one calibration variant."""
    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.quantize.block_calibration import attention_mask
    from qdlm_export.quantize.calibration import calibration_tokens

    def config(**fields):
        return CalibrationConfig(source=str(train), nsamples=args.nsamples, seqlen=args.seqlen, seed=seed, **fields)

    if variant == "block-causal":
        tokens = calibration_tokens(tokenizer, config(attention="block-causal"), mask_id, block)
        return tokens, attention_mask("block-causal", args.seqlen, block)
    if variant == "block-causal, b last":
        tokens = calibration_tokens(tokenizer, config(masking="none"), mask_id)
        gen = torch.Generator().manual_seed(seed + 1000)
        start = (args.seqlen - 1) // block * block
        for row in range(tokens.shape[0]):
            count = max(1, math.ceil((1.0 - torch.rand((), generator=gen).item()) * (args.seqlen - start)))
            tokens[row, start + torch.randperm(args.seqlen - start, generator=gen)[:count]] = mask_id
        return tokens, attention_mask("block-causal", args.seqlen, block)
    if variant == "causal, clean":
        return calibration_tokens(tokenizer, config(masking="none"), mask_id), attention_mask("causal", args.seqlen)
    return calibration_tokens(tokenizer, config(masking="random", attention="full"), mask_id), None


def quantized(original, method: str, bits: int, tokens: torch.Tensor, mask: torch.Tensor | None):
    """A copy of ``original`` with every block quantized by ``method`` as the pipeline drives it."""
    from qdlm_export.families import family_by_name
    from qdlm_export.methods import build_method, make_config
    from qdlm_export.quantize.pipeline import capture_block_inputs, quantize_block

    model = copy.deepcopy(original)
    adapter = family_by_name("llada2_moe")
    blocks = adapter.block_list(model)
    quant = build_method(make_config(method, bits=bits, group_size=32), adapter, model.config)
    with torch.no_grad():
        calib = capture_block_inputs(model, blocks, tokens, 8, torch.device("cpu"), mask)
        for index, layer in enumerate(blocks):
            quantize_block(quant, layer, adapter.block_prefix(index), calib, propagate=index + 1 < len(blocks))
    return model


def held_out_steps(windows: torch.Tensor, block: int, mask_id: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out sampler steps by current block b: (inputs cut after block b with ceil(t * block) of its
    positions masked, which of block b's positions are masked)."""
    gen = torch.Generator().manual_seed(777)
    blocks = windows.shape[1] // block
    steps: dict[int, list] = {}
    for row in windows:
        b = int(torch.randint(0, blocks, (), generator=gen))
        ids = row[: (b + 1) * block].clone()
        count = max(1, math.ceil((1.0 - torch.rand((), generator=gen).item()) * block))
        masked = torch.zeros(block, dtype=torch.bool)
        masked[torch.randperm(block, generator=gen)[:count]] = True
        ids[b * block :][masked] = mask_id
        steps.setdefault(b, []).append((ids, masked))
    return {b: (torch.stack([i for i, _ in s]), torch.stack([m for _, m in s])) for b, s in steps.items()}


@torch.no_grad()
def score(original, model, held) -> tuple[float, float]:
    """(relative logit error of the current blocks, mean KL(float || quantized) at their masked positions)."""
    from qdlm_export.quantize.block_calibration import attention_mask

    diff = norm = kl = 0.0
    count = 0
    for b, (ids, masked) in sorted(held.items()):
        length = ids.shape[1]
        mask = attention_mask("block-causal", length, 32).expand(ids.shape[0], -1, -1, -1)
        want = original(input_ids=ids, attention_mask=mask).logits[:, b * 32 :].double()
        got = model(input_ids=ids, attention_mask=mask).logits[:, b * 32 :].double()
        diff += (got - want).pow(2).sum().item()
        norm += want.pow(2).sum().item()
        p, q = want[masked].log_softmax(-1), got[masked].log_softmax(-1)
        kl += (p.exp() * (p - q)).sum().item()
        count += int(masked.sum())
    return math.sqrt(diff / norm), kl / count


if __name__ == "__main__":
    main()
