"""Train a small LLaDA- or Dream-architecture model with the masked-diffusion objective, on a CPU.

The result is the package's shipped checkpoint of that family (qdlm_export/assets/tiny-llada, the
embedded default of ``qdlm-export quantize``, and qdlm_export/assets/tiny-dream): small real language
models that quantization can visibly hurt, unlike the random-weight fixtures.

* Data: the shipped corpus (qdlm_export/assets/corpus/default.txt: CPython standard-library
  docstrings and sources) tokenized with the shipped tokenizer (trained on the same corpus). The last
  ~5 % (``qdlm_export.eval.likelihood.split_corpus``) is held out; training draws random windows of
  ``--seqlen`` tokens from the rest.
* Model: ``qdlm_export.fixtures.build_tiny_model`` (the public checkpoints' config keys, remote code
  and tensor names), starting from the builder's seeded initial weights.
* Objective (LLaDA's forward process): per sequence ``t ~ U(eps, 1)`` (stratified across the batch,
  ``t_j = (u0 + j/b) mod 1``, so every batch spans all noise levels), each token is replaced by the
  mask token with probability ``t``. Loss (``--weighting``): ``per-sequence`` (default) averages each
  sequence's mean masked CE; ``elbo`` is LLaDA's ``sum_masked CE / t / (b * L)``, whose 1/t weights
  make a 16-sequence batch so noisy that the model stayed at the unigram plateau (measured: 6.22 nats
  held out after 1500 steps, no better at 15 % masking than at 90 %). Dream: the same with shifted
  logits (position i-1 predicts token i), and the first token is never masked.
* Optimiser: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay to
  ``--min-lr-ratio`` of the peak, gradient clipping at 1. fp32 training, bfloat16 storage.
* Output: a complete model folder (config, remote code, tokenizer from the builder; the trained
  weights in model.safetensors) plus training.json: the run's settings, steps, tokens seen, final
  train loss, held-out masked-token NLL (and the random-init and unigram baselines), wall time,
  machine and the sha256 of model.safetensors.

Deterministic for a seed and thread count. About 10-20 minutes per model on 2 CPU threads:

    python examples/train_tiny_dllm.py --family llada
    python examples/train_tiny_dllm.py --family dream
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qdlm_export.calibration import tokenize_corpus
from qdlm_export.eval.likelihood import (
    DEFAULT_RATIOS,
    HELDOUT_FRACTION,
    corpus_split,
    heldout_tokens,
    masked_token_nll_per_ratio,
)
from qdlm_export.fixtures import MASK_ID, build_tiny_model, tokenizer_dir
from qdlm_export.machine import cpu_name

ASSETS = Path(__file__).resolve().parents[1] / "qdlm_export" / "assets"
EVAL_WINDOWS, EVAL_SEQLEN, EVAL_SEED = 64, 128, 0  # the held-out set every reported NLL uses

CARD = """\
# tiny-{family}

A small {arch} trained by `examples/train_tiny_dllm.py` with the masked-diffusion objective on the
corpus shipped with qdlm-export (CPython standard-library docstrings and sources), laid out exactly
like `{public}` (same config keys, remote code and tensor names): {layers} layers, hidden {hidden},
{heads} heads ({kv_heads} KV heads), MLP {inter}, vocab 2048, bfloat16.{shift}

Held-out masked-token NLL: **{nll:.3f} nats** (random init: {rand_nll:.3f}; unigram cross-entropy of
the held-out text: {unigram:.3f}). Training run: training.json. Details: docs/models.md.

Load it with `AutoModel.from_pretrained(path, trust_remote_code=True)`.
Regenerate it with `python examples/train_tiny_dllm.py --family {family}`.
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=("llada", "dream"), required=True)
    p.add_argument("--out", type=Path, help="model folder (default: qdlm_export/assets/tiny-<family>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: the builder's (MHA LLaDA, GQA 2:1 Dream)")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=1e-3, help="t ~ U(eps, 1)")
    p.add_argument("--weighting", choices=("elbo", "per-sequence"), default="per-sequence",
                   help="elbo: LLaDA's sum CE/t over the batch; per-sequence: each sequence's mean masked CE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    return p.parse_args()


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def diffusion_loss(model, ids, gen, *, eps: float, logits_shift: bool,
                   weighting: str = "elbo") -> tuple[torch.Tensor, float]:
    """LLaDA's objective on a batch: (loss to minimise, plain mean CE of the masked tokens)."""
    b, seqlen = ids.shape
    u0 = torch.rand(1, generator=gen)
    t = (u0 + torch.arange(b) / b) % 1
    p = (1 - eps) * t + eps
    mask = torch.rand(b, seqlen, generator=gen) < p[:, None]
    if logits_shift:
        mask[:, 0] = False  # the first token has no prediction of its own
    noisy = torch.where(mask, torch.full_like(ids, MASK_ID), ids)
    logits = model(input_ids=noisy).logits
    if logits_shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ce = F.cross_entropy(logits[mask], ids[mask], reduction="none")
    if weighting == "per-sequence":
        # Each sequence's mean masked CE, averaged over the batch: the same per-noise-level terms as the
        # ELBO up to a 1/(t L) -> 1/#masked normalisation, without the ELBO's 1/t variance at small t,
        # which at a CPU batch size keeps the clipped gradient noisy and the model at the unigram plateau.
        per_seq = torch.zeros(b).index_add_(0, mask.nonzero()[:, 0], ce)
        counts = mask.sum(1)
        keep = counts > 0
        return (per_seq[keep] / counts[keep]).mean(), ce.mean().item()
    weights = (1.0 / p)[:, None].expand(b, seqlen)[mask]
    positions = b * (seqlen - 1 if logits_shift else seqlen)
    return (ce * weights).sum() / positions, ce.mean().item()


def load_model(folder: Path, dtype: torch.dtype):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype)


def unigram_baselines(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> dict:
    """Entropy of the held-out tokens' own unigram distribution, and the cross-entropy of a unigram
    model of the training tokens (add-one smoothed) on them, in nats per token."""
    counts = torch.bincount(eval_ids.reshape(-1), minlength=vocab).double()
    q = counts / counts.sum()
    entropy = -(q[q > 0] * q[q > 0].log()).sum().item()
    train = torch.bincount(train_ids.reshape(-1), minlength=vocab).double() + 1
    cross = -(q * (train / train.sum()).log()).sum().item()
    return {"heldout_unigram_entropy": entropy, "train_unigram_cross_entropy": cross}


def machine() -> dict:
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out or ASSETS / f"tiny-{args.family}"
    logits_shift = args.family == "dream"
    kv_heads = args.kv_heads or (args.heads if args.family == "llada" else max(1, args.heads // 2))
    sizes = dict(hidden_size=args.hidden, intermediate_size=args.inter, num_layers=args.layers,
                 num_heads=args.heads, num_kv_heads=kv_heads)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    train_text, heldout_text = corpus_split(HELDOUT_FRACTION)
    train_ids = tokenize_corpus(tok, train_text)
    heldout_ids = tokenize_corpus(tok, heldout_text)
    eval_windows = heldout_tokens(tok, EVAL_WINDOWS, EVAL_SEQLEN, EVAL_SEED)
    quick_eval = eval_windows[:16]
    print(f"corpus: {len(train_text):,} train chars = {train_ids.numel():,} tokens; "
          f"held out {len(heldout_text):,} chars = {heldout_ids.numel():,} tokens")

    work = Path(tempfile.mkdtemp(prefix=f"train-{args.family}-"))
    try:
        init_dir = build_tiny_model(args.family, work / "init", seed=args.seed, dtype=torch.float32, **sizes)
        model = load_model(init_dir, torch.float32)
        model.train()
        names = set(load_file(init_dir / "model.safetensors"))
        params = dict(model.named_parameters())
        assert set(params) == names, sorted(set(params) ^ names)
        n_params = sum(p.numel() for p in params.values())
        print(f"{args.family}: {n_params / 1e6:.2f} M parameters, {args.steps} steps of "
              f"{args.batch} x {args.seqlen} tokens, {args.threads} threads")

        decay = [p for n, p in params.items() if p.dim() == 2]
        no_decay = [p for n, p in params.items() if p.dim() != 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
        data_gen = torch.Generator().manual_seed(args.seed + 1)
        mask_gen = torch.Generator().manual_seed(args.seed + 2)
        high = train_ids.numel() - args.seqlen

        start, cpu_start = time.time(), time.process_time()
        ema = ema_ce = None
        history = []
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            starts = torch.randint(0, high + 1, (args.batch,), generator=data_gen)
            ids = torch.stack([train_ids[s : s + args.seqlen] for s in starts.tolist()])
            loss, ce = diffusion_loss(model, ids, mask_gen, eps=args.eps, logits_shift=logits_shift,
                                      weighting=args.weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            ema_ce = ce if ema_ce is None else 0.98 * ema_ce + 0.02 * ce
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                elapsed = time.time() - start
                eta = elapsed / done * (args.steps - done)
                print(f"step {done:5d}/{args.steps}  loss {ema:.3f}  masked CE {ema_ce:.3f}  "
                      f"lr {lr_at(step, args):.2e}  {done * ids.numel() / elapsed:,.0f} tok/s  "
                      f"elapsed {elapsed / 60:.1f} min (CPU {(time.process_time() - cpu_start) / 60:.1f})  "
                      f"ETA {eta / 60:.1f} min", flush=True)
            if done % args.eval_every == 0 or done == args.steps:
                nll = masked_token_nll_per_ratio(model, quick_eval, mask_token_id=MASK_ID, logits_shift=logits_shift)
                mean = sum(nll.values()) / len(nll)
                history.append({"step": done, "train_loss_ema": ema, "train_masked_ce_ema": ema_ce,
                                "heldout_nll_quick": mean})
                print(f"  held-out masked NLL (16 windows) {mean:.3f}  "
                      + "  ".join(f"{r}:{v:.2f}" for r, v in nll.items()), flush=True)
        wall, cpu = time.time() - start, time.process_time() - cpu_start

        # The shipped folder: the builder's bfloat16 layout, then the trained weights in its place.
        if out.exists():  # keep the remote code: it is the builder's source (fixtures point here)
            for item in out.iterdir():
                if item.suffix != ".py":
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        build_tiny_model(args.family, out, seed=args.seed, dtype=torch.bfloat16, **sizes)
        trained = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in params.items()}
        save_file(trained, str(out / "model.safetensors"), metadata={"format": "pt"})

        shipped = load_model(out, torch.bfloat16).eval()
        final = masked_token_nll_per_ratio(shipped, eval_windows, mask_token_id=MASK_ID, logits_shift=logits_shift)
        random_init = load_model(build_tiny_model(args.family, work / "rand", seed=args.seed,
                                                  dtype=torch.bfloat16, **sizes), torch.bfloat16).eval()
        baseline = masked_token_nll_per_ratio(random_init, eval_windows, mask_token_id=MASK_ID,
                                              logits_shift=logits_shift)
        unigram = unigram_baselines(train_ids, heldout_ids, len(tok))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mean = sum(final.values()) / len(final)
    rand_mean = sum(baseline.values()) / len(baseline)
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    record = {
        "family": args.family,
        "objective": "masked diffusion (LLaDA): t~U(eps,1) stratified per batch, mask w.p. t, "
                     + ("sum CE/t over masked / (batch*positions)" if args.weighting == "elbo"
                        else "mean over sequences of each sequence's mean masked CE")
                     + (", shifted logits" if logits_shift else ""),
        "weighting": args.weighting,
        "init": "qdlm_export.fixtures.build_tiny_model(seed)",
        "seed": args.seed, "threads": args.threads,
        "sizes": {"hidden_size": args.hidden, "intermediate_size": args.inter, "num_layers": args.layers,
                  "num_heads": args.heads, "num_kv_heads": kv_heads, "vocab_size": len(tok)},
        "parameters": n_params,
        "steps": args.steps, "batch_size": args.batch, "seqlen": args.seqlen,
        "tokens_seen": args.steps * args.batch * args.seqlen,
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "warmup_steps": args.warmup, "schedule": "linear warm-up, cosine decay",
                      "min_lr_ratio": args.min_lr_ratio, "grad_clip": 1.0, "eps_t": args.eps},
        "data": {"corpus": "qdlm_export/assets/corpus/default.txt", "heldout_fraction": HELDOUT_FRACTION,
                 "train_chars": len(train_text), "train_tokens": train_ids.numel(),
                 "heldout_chars": len(heldout_text), "heldout_tokens": heldout_ids.numel()},
        "final_train_loss": ema, "final_train_masked_ce": ema_ce,
        "eval": {"windows": EVAL_WINDOWS, "seqlen": EVAL_SEQLEN, "seed": EVAL_SEED, "ratios": list(DEFAULT_RATIOS),
                 "function": "qdlm_export.eval.likelihood.masked_token_nll (bfloat16 weights as shipped)"},
        "heldout_nll": mean, "heldout_nll_per_ratio": {str(k): v for k, v in final.items()},
        "random_init_heldout_nll": rand_mean,
        "random_init_heldout_nll_per_ratio": {str(k): v for k, v in baseline.items()},
        **unigram,
        "history": history,
        "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1), "machine": machine(),
        "model_safetensors_sha256": sha,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(CARD.format(
        family=args.family, arch="LLaDA" if args.family == "llada" else "Dream",
        public="GSAI-ML/LLaDA-8B-Base" if args.family == "llada" else "Dream-org/Dream-v0-Base-7B",
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=kv_heads, inter=args.inter,
        shift="" if args.family == "llada" else " Logits are shifted: position i-1 predicts token i.",
        nll=mean, rand_nll=rand_mean, unigram=unigram["train_unigram_cross_entropy"]), encoding="utf-8")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"held-out masked NLL {mean:.3f} nats (random init {rand_mean:.3f}, unigram entropy "
          f"{unigram['heldout_unigram_entropy']:.3f}, unigram cross-entropy {unigram['train_unigram_cross_entropy']:.3f})")
    print(f"wrote {out} ({size / 2**20:.2f} MiB) in {wall / 60:.1f} min of training ({cpu / 60:.1f} min CPU)")


if __name__ == "__main__":
    main()
