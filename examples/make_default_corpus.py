"""Regenerate qdlm_export/assets/corpus/default.txt, the calibration corpus shipped with the package.

The text is English prose and Python code that every machine already has: the docstrings and some
full sources of the CPython standard library (PSF license). The module lists below are fixed and
walked in sorted order, and sources are parsed with ``ast`` rather than imported, so the output
depends only on the Python version (recorded in SOURCE.md next to the corpus).

    python examples/make_default_corpus.py            # writes the shipped file
    python examples/make_default_corpus.py --out x.txt
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = ROOT / "qdlm_export" / "assets" / "corpus"

# Modules whose docstrings (module, classes, functions, methods) give the English prose.
PROSE_MODULES = sorted([
    "argparse", "ast", "base64", "bdb", "calendar", "cmd", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "difflib", "doctest", "email.message", "enum", "fractions",
    "ftplib", "functools", "gettext", "glob", "graphlib", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "imaplib", "inspect", "logging", "mailbox", "numbers", "operator", "optparse",
    "pathlib", "pdb", "pprint", "pydoc", "queue", "random", "sched", "shlex", "shutil", "smtplib",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "tokenize", "trace",
    "typing", "unittest.case", "urllib.parse", "uuid", "wave", "weakref", "xml.dom.minidom", "zipfile",
])

# Small, self-contained modules whose full source gives the code half.
CODE_MODULES = sorted([
    "bisect", "code", "colorsys", "copy", "csv", "fnmatch", "getopt", "glob",
    "graphlib", "heapq", "json.decoder", "json.encoder", "queue", "sched", "shlex", "string",
    "textwrap", "timeit",
])

PROSE_PER_MODULE = 5_000  # bytes of docstrings per module, so every module gets a say
CODE_BUDGET = 210_000  # bytes of source in all


def module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise SystemExit(f"{name}: no pure-Python source on this interpreter")
    return Path(spec.origin).read_text(encoding="utf-8")


def docstrings(name: str) -> list[str]:
    """Module, class and function docstrings of one module, in source order, each titled."""
    tree = ast.parse(module_source(name))
    out = []
    doc = ast.get_docstring(tree)
    if doc:
        out.append(f"{name}\n\n{doc}")

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                # Skip one-liners like "Return self." that carry almost no language.
                if doc and len(doc) >= 80 and not child.name.startswith("_"):
                    out.append(f"{qual}\n\n{doc}")
                if isinstance(child, ast.ClassDef):
                    walk(child, qual)

    walk(tree, name)
    return out


def take(documents: list[str], budget: int) -> list[str]:
    """The longest prefix of whole documents that fits in the byte budget."""
    kept, used = [], 0
    for doc in documents:
        size = len(doc.encode("utf-8")) + 2
        if used + size > budget:
            break
        kept.append(doc)
        used += size
    return kept


def build() -> str:
    prose = [d for m in PROSE_MODULES for d in take(docstrings(m), PROSE_PER_MODULE)]
    code = take([f"# {m}.py\n\n{module_source(m).strip()}" for m in CODE_MODULES], CODE_BUDGET)
    return "\n\n".join(prose + code) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CORPUS_DIR / "default.txt")
    args = parser.parse_args()
    text = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    if args.out.parent == CORPUS_DIR:
        (CORPUS_DIR / "SOURCE.md").write_text(
            "# default.txt\n\n"
            "Docstrings and source files of the CPython standard library, "
            f"Python {platform.python_version()}.\n"
            "Copyright (c) 2001-2024 Python Software Foundation; used under the PSF License Agreement "
            "(https://docs.python.org/3/license.html).\n\n"
            "Regenerate with `python examples/make_default_corpus.py` (fixed module lists, sorted).\n",
            encoding="utf-8",
        )
    print(f"wrote {args.out} ({len(text.encode('utf-8')):,} bytes)")


if __name__ == "__main__":
    main()
