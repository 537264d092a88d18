"""Rebuild the two bundled task data files from the shipped corpus (``assets/corpus/default.txt``).

    python -m qdlm_export.eval.tasks.build_data          # rewrites stdlib_mc.jsonl, stdlib_gen.jsonl

The corpus titles every docstring with its dotted name (``argparse.ArgumentParser`` then a blank
line then the text), so both tasks ask for facts that a model trained on that corpus has seen:

* ``stdlib_mc.jsonl`` - which of four names does module M provide? One entry per module: the
  right answer is a top-level class or function of M, the three others are top-level names of
  other modules that M does not define.
* ``stdlib_gen.jsonl`` - complete the first words of a docstring: given the title, the answer is the
  docstring's first three words.

Only the standard library's own text is used (PSF license, see ``assets/corpus/SOURCE.md``). The
choice of entries is seeded, so the output only changes when the corpus does.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[1] / "assets" / "corpus" / "default.txt"
SEED = 1234
N_MC = 48
N_GEN = 40

_TITLE = re.compile(r"[a-z_]\w*(\.[A-Za-z_]\w*)*")
_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")


def entries(text: str) -> list[tuple[str, str]]:
    """(title, first docstring line) pairs, in corpus order."""
    blocks = text.split("\n\n")
    out = []
    for title, body in zip(blocks, blocks[1:]):
        if _TITLE.fullmatch(title):
            out.append((title, body.split("\n", 1)[0].strip()))
    return out


def module_of(title: str) -> str | None:
    """The longest dotted prefix of ``title`` that is an importable module (``pathlib`` for
    ``pathlib.Path.cwd``, ``email.message`` for ``email.message.Message``)."""
    parts = title.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def build_mc(ents: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    top: dict[str, list[str]] = {}
    for title, _ in ents:
        m = module_of(title)
        if m is None:
            continue
        top.setdefault(m, [])
        rest = title[len(m) + 1:]
        if rest and "." not in rest and not rest.startswith("_"):
            top[m].append(rest)
    mods = [m for m in top if top[m]]
    rows = []
    for m in mods:
        answer = rng.choice(top[m])
        own = set(top[m])
        others = sorted({n for o in mods if o != m for n in top[o]} - own)
        distractors = rng.sample(others, 3)
        choices = distractors + [answer]
        rng.shuffle(choices)
        rows.append({"module": m, "choices": choices, "label": choices.index(answer), "answer": answer})
    rng.shuffle(rows)
    return rows[:N_MC]


def build_gen(ents: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    pool = []
    for title, first in ents:
        words = first.split()
        if "." not in title or len(words) < 4:
            continue
        three = words[:3]
        if not all(_WORD.fullmatch(w) for w in three):
            continue  # plain words only: no code, quotes or punctuation to argue about
        pool.append({"title": title, "answer": " ".join(three)})
    rng.shuffle(pool)
    per_module: Counter[str] = Counter()
    rows: list[dict] = []
    for row in pool:  # at most two entries per module, for spread; no repeated answers
        mod = module_of(row["title"]) or row["title"]
        if per_module[mod] >= 2 or any(r["answer"] == row["answer"] for r in rows):
            continue
        per_module[mod] += 1
        rows.append(row)
        if len(rows) == N_GEN:
            break
    return rows


def main() -> None:
    ents = entries(CORPUS.read_text(encoding="utf-8"))
    rng = random.Random(SEED)
    for name, rows in (("stdlib_mc.jsonl", build_mc(ents, rng)), ("stdlib_gen.jsonl", build_gen(ents, rng))):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
