"""Checking the values of a typed contract against its fields' annotations (the run spec, the model manifest,
the cache metadata): what a JSON file may hold, read as the dataclasses hold it.

No kdflow imports and no torch: the contracts on the planning side use it too.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any


def type_problems(value: Any, hint: Any, where: str) -> list[str]:
    """Where ``value`` is not of the type ``hint`` (an int is a float, as JSON and YAML write 32 for 32.0; a bool
    is no number), recursively through dataclasses (their compared fields), tuples and dicts."""
    if hint is Any:
        return []
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if any(not type_problems(value, a, where) for a in args):
            return []
        return [f"{where} = {value!r} is not {' or '.join(type_name(a) for a in args)}"]
    if origin is tuple:
        if not isinstance(value, tuple):
            return [f"{where} = {value!r} is not a list"]
        if args[-1] is not Ellipsis and len(args) != len(value):
            return [f"{where} = {list(value)!r} does not have {len(args)} items"]
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        pairs = enumerate(zip(value, items, strict=True))
        return [p for i, (v, a) in pairs for p in type_problems(v, a, f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where} = {value!r} is not a mapping"]
        return [p for k, v in value.items() for p in type_problems(v, args[1], f"{where}.{k}")]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            return [f"{where} = {value!r} is not a {hint.__name__}"]
        return dataclass_problems(value, where)
    ok = {
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        type(None): lambda v: v is None,
    }.get(hint, lambda v: isinstance(v, hint))
    return [] if ok(value) else [f"{where} = {value!r} is not {type_name(hint)}"]


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, resolved once per class (each call re-evaluates every annotation)."""
    return typing.get_type_hints(cls)


def dataclass_problems(obj: Any, where: str = "") -> list[str]:
    """:func:`type_problems` of each compared field of the dataclass instance ``obj`` (named ``where.field``)."""
    hints = type_hints(type(obj))
    return [
        p
        for f in dataclasses.fields(obj)
        if f.compare
        for p in type_problems(getattr(obj, f.name), hints[f.name], f"{where}.{f.name}" if where else f.name)
    ]


def type_name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
