"""The layer rules of docs/ARCHITECTURE.md hold in the code: every import between the package's
stages (lazy imports inside functions included) is one the table allows, no module is over 500
lines, the top level stays small, no module is named like a standard-library module, and every
package says in its docstring what it owns.

The allowed imports are read from the table in docs/ARCHITECTURE.md, so the document and the code
cannot drift apart silently."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qdlm_export"
# Model code written like its publishers' (remote code of the tiny and published stand-in models):
# it is data the tool loads, not part of the tool's layers.
MODEL_CODE = ("fixtures/published", "assets")
MAX_LINES = 500
MAX_TOP_LEVEL_MODULES = 3  # __init__.py, errors.py, and room for one more


def _layer_table() -> dict[str, set[str]]:
    """``stage -> stages it may import`` from ARCHITECTURE.md's "Layer rules" table."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Layer rules", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        stage = cells[0].strip("`")
        table[stage] = set(re.findall(r"`([a-z_]+)`", cells[1]))
    return table


def _modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py")
        if not any(str(p.relative_to(PACKAGE)).startswith(prefix) for prefix in MODEL_CODE)
    )


def _stage(module: str) -> str:
    """``qdlm_export.format.spec`` -> ``format``; a top-level module is its own stage."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every package module ``path`` imports, as absolute names, with line numbers."""
    module, is_package = _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from qdlm_export import methods`` imports a stage; ``from qdlm_export import __version__``
            # only the package root's metadata.
            names = [
                f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names
            ] if target == "qdlm_export" else [target]
            found += [(node.lineno, name) for name in names if name.startswith("qdlm_export")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("qdlm_export")]
    return found


def test_the_table_names_every_stage():
    table = _layer_table()
    stages = {_stage(_module_name(p)[0]) for p in _modules()} - {""}
    assert stages <= set(table), f"stages missing from ARCHITECTURE.md's layer table: {sorted(stages - set(table))}"
    for stage, allowed in table.items():
        assert stage not in allowed, f"{stage} lists itself"
        assert allowed <= set(table), f"{stage} may import unknown stages {sorted(allowed - set(table))}"


def test_imports_follow_the_layer_rules():
    table = _layer_table()
    violations = []
    for path in _modules():
        module, _ = _module_name(path)
        stage = _stage(module)
        if stage == "" and path.name == "__init__.py":
            continue  # the package root wires the stages together (registrations at import)
        for line, target in _imports(path):
            target_stage = _stage(target)
            if target_stage in ("", stage):
                continue
            if target_stage not in table.get(stage, set()):
                violations.append(f"{path.relative_to(ROOT)}:{line} ({stage}) imports {target}")
    assert not violations, "imports the layer rules forbid:\n" + "\n".join(violations)


def test_nothing_imports_the_cli():
    users = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in _modules() if _stage(_module_name(p)[0]) != "cli"
        for line, target in _imports(p) if _stage(target) == "cli"
    ]
    assert not users


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it"


def test_small_top_level_and_no_stdlib_names():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    shadowing = [
        str(p.relative_to(ROOT)) for p in _modules()
        if p.stem in sys.stdlib_module_names or (p.name == "__init__.py" and p.parent.name in sys.stdlib_module_names)
    ]
    assert not shadowing, f"modules named like standard-library modules: {shadowing}"


def test_every_package_says_what_it_owns():
    for init in PACKAGE.rglob("__init__.py"):
        if any(str(init.relative_to(PACKAGE)).startswith(prefix) for prefix in MODEL_CODE):
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 4, f"{init.relative_to(ROOT)} needs a docstring saying what it owns"
