"""Train the small byte-level BPE tokenizer shipped in qdlm_export/assets/tokenizer/.

It is trained on the shipped calibration corpus (qdlm_export/assets/corpus/default.txt), so the tiny
test models and the embedded default checkpoint tokenize that corpus compactly. Byte-level BPE, like
the GPT-2/Qwen2 tokenizers, so any text round-trips exactly. The three special tokens come first
(ids 0, 1, 2): ``<|endoftext|>`` (eos), ``<|mdm_mask|>`` (the diffusion mask token, the name
LLaDA uses) and ``<|pad|>``; padding must not reuse the mask id.

    python examples/train_tokenizer.py                 # vocab 2048, writes the shipped folder
    python examples/train_tokenizer.py --out /tmp/tok --vocab-size 4096
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# One worker thread, so that merges with tied counts always come out in the same order.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "qdlm_export" / "assets"
SPECIAL_TOKENS = ["<|endoftext|>", "<|mdm_mask|>", "<|pad|>"]


def train(corpus: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json plus the two small JSON files AutoTokenizer reads.

    The config names the generic ``PreTrainedTokenizerFast`` class (no custom code), which every
    transformers version maps to its tokenizers-backed fast tokenizer.
    """
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"eos_token": "<|endoftext|>", "mask_token": "<|mdm_mask|>", "pad_token": "<|pad|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ASSETS / "corpus" / "default.txt")
    parser.add_argument("--out", type=Path, default=ASSETS / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()
    tok = train(args.corpus, args.vocab_size)
    save(tok, args.out)
    text = args.corpus.read_text(encoding="utf-8")
    n = len(tok.encode(text).ids)
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()}, corpus = {n:,} tokens "
          f"({len(text.encode('utf-8')) / n:.2f} bytes/token)")


if __name__ == "__main__":
    main()
