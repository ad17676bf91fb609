"""Run options: YAML recipes as parser defaults (timm style); flags given on the command line win.

A command calls :func:`defer_defaults` once its parser is built: every argument's default
is moved into a table and replaced by ``SUPPRESS``, so the parsed namespace holds only the
flags the user actually typed. :func:`resolve` then layers parser defaults < recipe < flags
(with ``saved``, a resumed run's own options, between the defaults and the recipe).
A recipe is a flat mapping of option names (``batch_size`` or ``batch-size``); an unknown
key is a one-line ``UserError`` naming the file and the key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

from compressor.errors import UserError, suggest

_TABLE = "_arg_defaults"
_ACTIONS = "_arg_actions"


def defer_defaults(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    table: dict[str, Any] = {}
    actions: dict[str, argparse.Action] = {}
    for a in p._actions:  # noqa: SLF001 - argparse has no public API for this
        if a.dest in (argparse.SUPPRESS, "help") or isinstance(a, argparse._HelpAction):  # noqa: SLF001
            continue
        table[a.dest] = a.default
        actions[a.dest] = a
        if a.default not in (None, False, []) and "default" not in (a.help or ""):
            a.help = f"{a.help} (default {a.default})" if a.help else f"default {a.default}"
        a.default = argparse.SUPPRESS
        a.required = False  # a recipe may supply it; resolve() checks
    p.set_defaults(**{_TABLE: table, _ACTIONS: actions})
    return p


def read(path: str | Path) -> dict[str, Any]:
    """A recipe file as a flat dict (keys with ``-`` normalized to ``_``), read with the shared
    bounds (``storage.yaml_io``: size, depth, aliases, duplicate keys): every failure is one line."""
    from compressor.storage import yaml_io

    src = str(path)
    doc = yaml_io.load_yaml(path, kind="recipe file")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise UserError(f"a recipe is a mapping of option: value, got {type(doc).__name__}", source=src)
    return {str(k).replace("-", "_"): v for k, v in doc.items()}


def _check_value(key: str, value: Any, action: argparse.Action, src: str) -> Any:
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,  # noqa: SLF001
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"must be true or false, got {value!r}", source=src, field=key)
        return value
    typ = action.type
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise UserError("must be a single value, got a list", source=src, field=key)
    out = []
    for v in items:
        if typ in (int, float):
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise UserError(f"must be a number, got {v!r}", source=src, field=key)
            try:
                v = typ(v)
            except ValueError as exc:
                raise UserError(f"must be {'an integer' if typ is int else 'a number'}, got {v!r}",
                                source=src, field=key) from exc
            if typ is int and isinstance(v, float):
                raise UserError(f"must be an integer, got {v!r}", source=src, field=key)
        elif typ is not None and isinstance(v, str):
            v = typ(v)
        if action.choices is not None and v not in action.choices:
            raise UserError(f"{v!r} is not one of {', '.join(map(str, action.choices))}", source=src, field=key)
        out.append(v)
    return out if many else out[0]


def resolve(args: argparse.Namespace, required: tuple[str, ...] = (), *, saved: Mapping[str, Any] | None = None,
            saved_source: str = "<saved options>") -> argparse.Namespace:
    """Parser defaults < ``saved`` < recipe (``args.config``) < flags typed; returns a full namespace.

    ``saved``: the options a resumed run was made with (keys this parser does not have are
    ignored, so a ``train`` run's options can seed ``finetune``); ``saved_source`` names them in errors.
    """
    table: Mapping[str, Any] = getattr(args, _TABLE)
    actions: Mapping[str, argparse.Action] = getattr(args, _ACTIONS)
    given = {k: v for k, v in vars(args).items() if k in table}
    merged = dict(table)
    for key, value in (saved or {}).items():
        key = str(key).replace("-", "_")
        if key in table and key != "config":
            merged[key] = _check_value(key, value, actions[key], saved_source)
    config = given.get("config")
    if config:
        src = str(config)
        for key, value in read(config).items():
            if key not in table or key == "config":
                raise UserError(f"unknown key {key!r}{suggest(key, table)}", source=src)
            merged[key] = _check_value(key, value, actions[key], src)
    merged.update(given)
    for key in required:
        if merged.get(key) in (None, ""):
            raise UserError(f"--{key.replace('_', '-')} is required (as a flag or a recipe key)", field=key)
    extra = {k: v for k, v in vars(args).items() if k not in table and not k.startswith("_arg")}
    return argparse.Namespace(**extra, **merged, _resolved_keys=list(table))


def to_yaml(args: argparse.Namespace, header: str = "") -> str:
    """The resolved options as a recipe (re-usable with ``--config``)."""
    import yaml

    keys = getattr(args, "_resolved_keys", None) or [k for k in vars(args) if not k.startswith("_")]
    doc = {k: _plain(getattr(args, k)) for k in keys if k != "config" and hasattr(args, k)}
    lines = [f"# {ln}" for ln in header.splitlines()]
    if getattr(args, "config", None):
        lines.append(f"# recipe: {args.config} (flags given on the command line override it)")
    return "\n".join(lines + [yaml.safe_dump(doc, sort_keys=False)])


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def recipe_table() -> str:
    """The per-model ``train:`` defaults of the packaged recipes, one line each (for ``train --help``)."""
    from compressor.training.recipe import MODEL_RECIPES, model_table

    rows = [f"  {name:<14} " + ", ".join(f"{k} {v}" for k, v in (entry.get("train") or {}).items())
            for name, entry in model_table().items() if isinstance(entry, dict) and entry.get("train")]
    return f"\nper-model defaults in use ({MODEL_RECIPES.name}, matched by name prefix):\n" + "\n".join(rows) + "\n"
