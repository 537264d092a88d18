"""Self-contained checkpoints: the qdlm loader travels with the model as remote code.

A native checkpoint of a remote-code family (LLaDA, Dream) already ships its modeling files and is
loaded with ``trust_remote_code=True``; the only missing piece is the ``qdlm`` quantizer, which
``import qdlm_export`` registers. A transformers-native family (Llama, Qwen2, Mistral) has no
modeling file; :mod:`.native_wrappers` gives its checkpoint a model type of its own with two generated
modeling files, which then play that part. :func:`make_self_contained` adds the loader to the folder:

* **copies of the package's own loader code**, flattened into the folder as ``qdlm_*.py``: the
  loader (``qdlm_loader.py``: ``QdlmConfig``, ``QdlmHfQuantizer``, ``QdlmLinear``), what it imports
  (format spec, packing, transforms, activation quantization, errors) and the torch and Triton
  weight-only kernels. They are the package's modules verbatim except for their import lines, which
  are rewritten to point at the copies (``from ..format.spec import X`` -> ``from .qdlm_spec
  import X``), so a self-contained checkpoint computes exactly what the installed package computes.
  ``qdlm_export.kernels`` (whose ``__init__`` imports every op module and its backends) is replaced by the
  small stand-in in ``loader/remote_kernels.py``: the Triton kernel when triton and a CUDA tensor
  are there, the torch fallback otherwise.
* **two lines at the end of each remote-code module named in ``auto_map``** that import
  ``qdlm_loader`` and call its ``register_with_transformers()``. transformers imports those modules
  before it reads ``quantization_config``, so the quantizer is registered in time. The registration
  is guarded: when qdlm-export is installed too, whichever registers first serves both.

The copies may import only the standard library, torch and transformers; triton imports are put in
a ``try`` block, which transformers' dependency check skips, so a machine without triton loads the
model (the Triton file is imported only when triton can run). Anything else (numpy, another
package module the shim does not provide) makes :func:`make_self_contained` fail with the reason:
the export would not load where qdlm-export is absent.

The relative imports use the ``from .module import name`` form: transformers copies remote-code
files found by that pattern into its module cache, and the plain ``from . import module`` form is
not copied.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..format.spec import FORMAT_NAME

PACKAGE = "qdlm_export"
ROOT_MODULE = "qdlm_export.loader.hf_quantizer"  # what the modeling files import (its register_with_transformers)
LOADER_FILE = "qdlm_loader"
COMPAT_MODULE = "qdlm_export.families.compat"  # also carried: repairs published remote code in memory
COMPAT_FILE = "qdlm_compat"
# Package modules replaced by a stand-in written from another source module.
SHIMS = {"qdlm_export.kernels": "qdlm_export.loader.remote_kernels"}
EXPORT_NAMES = {"qdlm_export.kernels": "qdlm_kernels", ROOT_MODULE: LOADER_FILE}
ALLOWED_THIRD_PARTY = {"torch", "transformers"}
OPTIONAL_THIRD_PARTY = {"triton"}  # imported inside try, only when usable
MARKER = "# qdlm-export self-contained loader"
COPIED_HEADER = "# Copied by qdlm-export"  # first line of every loader copy (what may be refreshed)
REGISTRATION = (
    f"\n\n{MARKER}: registers the `qdlm` quantization method with transformers so that this folder\n"
    "# loads with torch + transformers only (see qdlm_loader.py). Harmless when qdlm-export is installed.\n"
    f"from .{LOADER_FILE} import register_with_transformers as _qdlm_register_with_transformers\n\n"
    "_qdlm_register_with_transformers()\n"
    # Repairs, in memory, the known incompatibilities of published remote code with the installed
    # transformers (qdlm_compat.py = qdlm_export/families/compat.py), so the folder loads as it did
    # when it was quantized.
    f"from .{COMPAT_FILE} import repair_module as _qdlm_repair_module\n\n"
    "_qdlm_repair_module(globals())\n"
)
# For refusals caused by the source model's own files: the way out that always works.
_NOT_SELF_CONTAINED_HINT = ("quantize with --no-self-contained: the checkpoint then loads wherever qdlm-export is "
                            "installed (pip install qdlm-export)")
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\S+)\s+import|import\s+\.(\S+)\s*$)", re.MULTILINE)


@dataclass(frozen=True)
class _Source:
    module: str  # the package module it stands for (what other copies import)
    origin: str  # the package module whose source is copied
    path: Path


def _module_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"cannot locate {module} to copy into a self-contained checkpoint")
    return Path(spec.origin)


def _export_name(module: str) -> str:
    return EXPORT_NAMES.get(module) or "qdlm_" + module.rsplit(".", 1)[-1]


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from X import`` refers to."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _inside_try(tree: ast.Module) -> set[int]:
    """Ids of import nodes that sit inside a ``try`` (transformers' dependency check skips them)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    ids.add(id(child))
    return ids


def _is_stdlib(name: str) -> bool:
    return name in sys.stdlib_module_names or name == "__future__"


def _vendor(module: str, origin: str) -> tuple[str, list[str], dict[str, set[str]]]:
    """Rewrite one module's source: returns (text, package modules it needs, names it takes from each)."""
    path = _module_path(origin)
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    in_try = _inside_try(tree)
    edits: list[tuple[int, int, str]] = []  # (first line, last line, replacement), 1-based inclusive
    needs: list[str] = []
    wanted: dict[str, set[str]] = {}
    where = f"{path.relative_to(_module_path(PACKAGE).parent.parent)}"
    pkg = _is_package(origin)

    def local(target: str) -> str:
        if target == PACKAGE:
            raise ConfigError(f"{where} imports the {PACKAGE} package itself, which a self-contained checkpoint cannot carry")
        if target not in needs:
            needs.append(target)
        return _export_name(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(node, origin, pkg)
            top = target.split(".")[0]
            if node.level or top == PACKAGE:
                if node.module is None:
                    raise ConfigError(
                        f"{where} uses `from {'.' * node.level} import ...`; write `from .module import name` so the "
                        "self-contained copy can be rewritten (and so transformers copies it)"
                    )
                indent = lines[node.lineno - 1][: node.col_offset]
                names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
                edits.append((node.lineno, node.end_lineno or node.lineno, f"{indent}from .{local(target)} import {names}\n"))
                wanted.setdefault(target, set()).update(a.name for a in node.names)
            else:
                _check_third_party(top, node, in_try, where)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == PACKAGE:
                    raise ConfigError(f"{where} uses `import {alias.name}`; use a relative `from .x import y` import")
                if _check_third_party(top, node, in_try, where):
                    edits.append((node.lineno, node.end_lineno or node.lineno, _try_wrap(lines, node)))
    for first, last, new in sorted(set(edits), reverse=True):
        lines[first - 1 : last] = [new]
    header = (
        f"{COPIED_HEADER} from {origin.replace('.', '/')}.py for a self-contained checkpoint (imports\n"
        "# rewritten to the copies beside it). Edit the package, not this file.\n"
    )
    return header + "".join(lines), needs, wanted


def _check_third_party(top: str, node: ast.AST, in_try: set[int], where: str) -> bool:
    """True when the import must be wrapped in ``try`` (an optional dependency outside one)."""
    if _is_stdlib(top) or top in ALLOWED_THIRD_PARTY:
        return False
    if top in OPTIONAL_THIRD_PARTY:
        return id(node) not in in_try
    if id(node) in in_try:
        return False  # already optional
    raise ConfigError(
        f"{where} imports {top}, which a self-contained checkpoint cannot assume is installed "
        f"(allowed: the standard library, {', '.join(sorted(ALLOWED_THIRD_PARTY))}; optional: "
        f"{', '.join(sorted(OPTIONAL_THIRD_PARTY))})",
        hint="keep the loader's import chain free of other dependencies, or import them inside try",
    )


def _try_wrap(lines: list[str], node: ast.Import) -> str:
    """The import inside ``try`` (re-raising): transformers' dependency check skips try blocks, and
    the copy is only imported where the dependency is usable."""
    pad = lines[node.lineno - 1][: node.col_offset]
    stmt = "".join(lines[node.lineno - 1 : node.end_lineno or node.lineno]).strip()
    return (
        f"{pad}try:  # optional dependency: this code runs only where it is installed\n"
        f"{pad}    {stmt}\n"
        f"{pad}except ImportError:  # pragma: no cover\n"
        f"{pad}    raise\n"
    )


def loader_files() -> dict[str, str]:
    """File name -> text of every ``qdlm_*.py`` a self-contained checkpoint carries.

    Follows the imports of the package loader, copying each module it reaches (rewritten) or its
    stand-in; raises :class:`ConfigError` when the chain needs something a checkpoint cannot carry.
    """
    files: dict[str, str] = {}
    sources: dict[str, str] = {}  # export name -> module it stands for
    pending = [ROOT_MODULE, COMPAT_MODULE]
    provided: dict[str, set[str]] = {}
    wanted: dict[str, set[str]] = {}
    while pending:
        module = pending.pop(0)
        name = _export_name(module)
        if name in sources:
            if sources[name] != module:
                raise ConfigError(f"{module} and {sources[name]} would both be copied as {name}.py")
            continue
        sources[name] = module
        origin = SHIMS.get(module, module)
        if _is_package(origin) and module not in SHIMS:
            raise ConfigError(
                f"the loader imports the package {module}; a self-contained checkpoint copies modules, not packages",
                hint=f"import from its modules, or add a stand-in for it to SHIMS in {__name__}",
            )
        text, needs, takes = _vendor(module, origin)
        files[f"{name}.py"] = text
        provided[module] = _top_level_names(ast.parse(text))
        for target, names in takes.items():
            wanted.setdefault(target, set()).update(names)
        pending.extend(n for n in needs if n not in pending)
    for target, names in wanted.items():
        missing = sorted(names - provided.get(target, set()))
        if missing:
            raise ConfigError(
                f"the loader's copies import {', '.join(missing)} from {target}, which its self-contained copy "
                f"({_export_name(target)}.py) does not define",
                hint="add them to loader/remote_kernels.py" if target in SHIMS else None,
            )
    _check_copied_together(files)
    return files


def _check_copied_together(files: dict[str, str]) -> None:
    """transformers finds the files to copy by a regex over the text: every relative import it would
    see (even in a docstring) must name a file we write."""
    for name, text in files.items():
        for match in _RELATIVE_IMPORT.finditer(text):
            target = (match.group(1) or match.group(2)).split(".")[0]
            if f"{target}.py" not in files:
                raise ConfigError(f"{name} mentions a relative import of {target!r}, which is not carried")


def _remote_modules(config: dict, folder: Path) -> list[Path]:
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        raise ConfigError(
            f"{folder} has no auto_map in config.json: it is not a remote-code model, so there is no modeling "
            "file to carry the loader",
            hint="a model transformers builds natively gets its wrapper auto_map automatically; this model_type "
            "is neither (its config lost auto_map?)",
        )
    files: list[Path] = []
    for key, ref in auto_map.items():
        if not (key.startswith("AutoModel") or key == "AutoConfig"):
            continue  # tokenizers and processors do not load weights
        for value in ref if isinstance(ref, (list, tuple)) else [ref]:
            if not isinstance(value, str):
                continue
            if "--" in value:
                raise ConfigError(
                    f"auto_map[{key!r}] = {value!r} points at code in another repository; the loader can only be "
                    "added to modeling files inside the checkpoint folder",
                    hint=_NOT_SELF_CONTAINED_HINT,
                )
            path = folder / (value.rsplit(".", 1)[0].replace(".", "/") + ".py")
            if not path.is_file():
                raise ConfigError(f"auto_map[{key!r}] names {path.name}, which is not in {folder}",
                                  hint="add that file to the model folder, or " + _NOT_SELF_CONTAINED_HINT)
            if path not in files:
                files.append(path)
    if not files:
        raise ConfigError(f"auto_map in {folder}/config.json names no model or config class",
                          hint=_NOT_SELF_CONTAINED_HINT)
    return files


def make_self_contained(folder: str | Path) -> list[Path]:
    """Make the native checkpoint in ``folder`` load with torch + transformers only.

    Writes the loader copies (``qdlm_*.py``) into ``folder`` and appends the registration to each
    remote-code module of ``auto_map`` (replacing the guard of a ``--no-self-contained`` export). A
    transformers-native family (Llama, Qwen2, Mistral) is first given its own model type and the
    generated wrapper files (``native_wrappers.py``). Idempotent: a second call refreshes the copies
    and leaves the modeling files as they are. Returns the files written or changed. Raises
    :class:`ConfigError` for a folder that is not a native checkpoint of either kind.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} has no config.json", hint="pass a checkpoint folder written by `qdlm-export quantize`")
    config = json.loads(config_path.read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != FORMAT_NAME:
        raise ConfigError(
            f"{folder} is not a native qdlm checkpoint (quant_method {qconfig.get('quant_method')!r}); only the "
            "native format needs the qdlm loader",
            hint="pass a native checkpoint (quantize --format native)",
        )
    from .native_wrappers import GUARD_MARKER, strip_added_code, wrap_native

    if wrap_native(folder):  # a transformers-native family: its own model type and wrapper files first
        config = json.loads(config_path.read_text())
    modules = _remote_modules(config, folder)
    files = loader_files()
    clash = [n for n in files if (folder / n).is_file() and not (folder / n).read_text().startswith(COPIED_HEADER)]
    if clash:
        raise ConfigError(f"{folder} already has {', '.join(clash)}, which are not qdlm-export's copies",
                          hint="rename or remove those files in the model folder, or " + _NOT_SELF_CONTAINED_HINT)
    written: list[Path] = []
    for name, text in files.items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    for path in modules:
        text = path.read_text(encoding="utf-8")
        if MARKER in text:
            continue
        if GUARD_MARKER in text:  # made with --no-self-contained: the loader replaces the guard
            text = strip_added_code(text)
        path.write_text(text.rstrip("\n") + REGISTRATION, encoding="utf-8")
        written.append(path)
    return written


def is_self_contained(folder: str | Path) -> bool:
    """Whether ``folder`` carries the loader (``qdlm_loader.py`` and the registration in its code)."""
    folder = Path(folder)
    if not (folder / f"{LOADER_FILE}.py").is_file():
        return False
    return any(MARKER in p.read_text(encoding="utf-8") for p in folder.glob("*.py"))
