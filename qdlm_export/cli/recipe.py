"""``quantize --config recipe.yaml``: every option of the command in a YAML file, keyed by the flag's
name without its leading dashes (``group-size``; ``group_size`` is accepted too). Flags given on the
command line win over the file; the file's values go through the same checks as the flags (they are
click's ``default_map``). Each checkpoint carries its resolved recipe (:func:`resolved_recipe`), so a
run reproduces with ``qdlm-export quantize --config CHECKPOINT/qdlm_recipe.yaml --out OTHER``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

# How a run behaves, not what it makes: accepted in a recipe, never written into one.
_RUN_ONLY = ("overwrite", "as_json", "verbose", "quiet")
_NOT_IN_FILE = ("recipe", "ctx", "help")


def _names(command) -> dict[str, str]:
    """Every accepted recipe key -> the command's parameter name."""
    names: dict[str, str] = {}
    for param in command.params:
        if param.name in _NOT_IN_FILE:
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        flag = longs[0][2:] if longs else param.name
        for key in {flag, flag.replace("-", "_"), param.name}:
            names[key] = param.name
    return names


def flag_name(command, name: str) -> str:
    for param in command.params:
        if param.name == name:
            longs = [o for o in param.opts if o.startswith("--")]
            return longs[0][2:] if longs else name
    return name


def load_recipe(ctx: typer.Context, param, value: Path | None) -> Path | None:
    """An eager callback: the file's values become the defaults of the options parsed after it."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {value}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"{value} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value} must hold a mapping of option names to values, not a {type(data).__name__}")
    names = _names(ctx.command)
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        if str(key) not in names:
            raise typer.BadParameter(
                f"{value}: unknown key {key!r}; accepted: {', '.join(sorted({flag_name(ctx.command, n) for n in names.values()}))}"
            )
        name = names[str(key)]
        if name == "option" and isinstance(item, dict):  # option: {block_size: 64} as -O block_size=64
            item = [f"{k}={_text(v)}" for k, v in item.items()]
        if item is not None:
            defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def publishable_path(text: str | None) -> str | None:
    """A local path as it may be published: relative paths as given, an absolute one relative to the
    current folder when it lies below it, else only its name (edit it to reproduce elsewhere)."""
    if text is None:
        return None
    path = Path(text).expanduser()
    if not path.exists() or not path.is_absolute():
        return text  # a Hub id, 'default', or a relative path as the user wrote it
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


def resolved_recipe(ctx: typer.Context, params: dict[str, Any], config, compute_dtype: str) -> dict[str, Any]:
    """Every option of the run with its resolved value, keyed like the flags, in --help's order.
    ``config`` is the method config the run used; method options beyond the flags go under ``option``."""
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    method_values = config.to_dict()
    recipe: dict[str, Any] = {}
    extra = []
    for name in fields:
        if name in params or name == "method":
            continue
        value, default = method_values[name], fields[name].default
        if value != default and (value is None or isinstance(value, (bool, int, float, str))):
            extra.append(f"{name}={_text(value)}")
    for param in ctx.command.params:
        name = param.name
        if name in _NOT_IN_FILE or name in _RUN_ONLY:
            continue
        value = params.get(name)
        if name in fields:
            value = method_values[name]
        elif name == "method":
            value = config.method
        elif name == "option":
            value = extra
        elif name in ("model", "calib"):
            value = publishable_path(value)
        elif name == "out_dir":
            value = Path(value).name
        elif name == "compute_dtype":
            value = compute_dtype
        recipe[flag_name(ctx.command, name)] = value
    return recipe
