"""Typed configs from YAML with dotted command-line overrides (torchtune-style), shared by every stage.

A config is a (nested) dataclass. `from_dict` builds it and refuses unknown keys with the key's dotted path, so a
typo in a recipe is an error rather than a silently ignored setting. `apply_overrides` takes `a.b.c=value`
strings; values are parsed as YAML scalars (so `1e-5`, `true`, `[1,2]` do what they look like)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rag_dpo.errors import InputError

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type[T], data: dict | None, where: str = "", file: str | None = None) -> T:
    """Build dataclass `cls` from a plain dict; nested dataclass fields are built recursively."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping, got {type(data).__name__}", file=file, field=where or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise InputError(f"unknown key (known: {', '.join(sorted(fields))})", file=file,
                         field=f"{where}.{key}" if where else key)
    kwargs = {}
    for name, value in data.items():
        tp = _unwrap_optional(hints.get(name, Any))
        path = f"{where}.{name}" if where else name
        if _is_dataclass_type(tp) and isinstance(value, dict):
            kwargs[name] = from_dict(tp, value, path, file)
        elif _is_dataclass_type(tp) and value is not None and not isinstance(value, dict):
            raise InputError("expected a mapping", file=file, field=path)
        else:
            kwargs[name] = _coerce(value, tp, path, file)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str, file: str | None) -> Any:
    if value is None or tp is Any:
        return value
    try:
        if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
        if tp is str and isinstance(value, (int, float)):
            return str(value)
    except ValueError:
        raise InputError(f"cannot read {value!r} as {tp.__name__}", file=file, field=path) from None
    if tp is bool and not isinstance(value, bool):
        raise InputError(f"expected true/false, got {value!r}", file=file, field=path)
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        if cur.get(k) is None:
            cur[k] = {}
        if not isinstance(cur[k], dict):
            raise InputError(f"cannot set '{dotted}': '{k}' is not a section", field=dotted)
        cur = cur[k]
    cur[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a nested dict (in place) and return it."""
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override '{item}' is not of the form key=value", field=item)
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"malformed YAML: {getattr(e, 'problem', e)}", file=str(path),
                         line=mark.line + 1 if mark else None) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason}); save the file as UTF-8", file=str(path)) from None
    if not isinstance(data, dict):
        raise InputError("a recipe must be a YAML mapping", file=str(path))
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """`base` (optional defaults) + YAML file (optional) + dotted overrides -> validated dataclass; later wins."""
    data = {**(base or {}), **(load_yaml(path) if path else {})}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data, file=str(path) if path else None)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=False)
