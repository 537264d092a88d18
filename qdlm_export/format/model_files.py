"""What a checkpoint carries from the model folder it was made from (docs/FORMAT.md, "Folder"): an
allow-list of the model's own files, used by ``quantize`` (from the source) and ``convert`` (from
the native checkpoint)."""

from __future__ import annotations

from pathlib import Path

from .reader import link_roots, stays_inside

# What a quantized checkpoint takes from its source folder is an allow-list (copyable_files): the
# model's own files (tokenizer, chat template, generation config, remote code, license), never weights
# (the tool writes its own), pickles, hidden files or anything else that happens to lie there.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".pkl", ".pickle",
                   ".npy", ".npz", ".joblib", ".onnx", ".tflite", ".index.json")
# Written by the tool itself (config, report, card) or describing the source's weights: never copied.
NOT_COPIED = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", ".gitattributes",
              "config.json", "qdlm_report.json"}
COPIED_PATTERNS = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "feature_extractor_config.json", "video_preprocessor_config.json",
    "*.jinja",                                          # chat templates
    "*.model", "*.tiktoken", "vocab*.json", "vocab*.txt", "vocab", "*.vocab", "merges.txt",  # tokenizers
    "*.py",                                             # remote code (auto_map modules and what they import)
    "LICENSE", "LICENSE.*", "LICENCE", "LICENCE.*", "NOTICE", "NOTICE.*", "USE_POLICY.md",  # terms of use
)


def copyable_model_files(folder: Path) -> list[Path]:
    """The model's own files in ``folder`` that a quantized checkpoint carries (``COPIED_PATTERNS``:
    code, tokenizer, chat template, generation config, license), regular files at the top level only.

    A symlink is copied as its content when it resolves inside ``folder`` (or, for a Hub download, to
    the cached blob of this repository); one pointing anywhere else is skipped with a warning: a
    checkpoint gets published, and a link out of the folder (to a token file, a home folder...) must
    never carry foreign content into it. Skipping rather than refusing keeps the source usable as it
    is; the warning names the file to copy in if it does belong to the model.
    """
    import fnmatch
    import warnings

    folder = Path(folder)
    roots = link_roots(folder)
    files = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if name.startswith(".") or name in NOT_COPIED or name.endswith(WEIGHT_SUFFIXES):
            continue
        if not any(fnmatch.fnmatchcase(name, pat) for pat in COPIED_PATTERNS):
            continue
        if p.is_symlink():
            if not stays_inside(p, roots):
                warnings.warn(
                    f"not copying {name} into the checkpoint: it is a symlink to a file outside the model folder "
                    f"{folder}; copy the file itself into the folder if it belongs to the model",
                    UserWarning,
                    stacklevel=3,
                )
                continue
        if p.is_file():  # a regular file, or a symlink to one inside the folder: copied as content
            files.append(p)
    return files
