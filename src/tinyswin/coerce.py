"""Values read from YAML or typed on the command line, converted to the type of a dataclass field."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal


def convert(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (unions, Literal, tuples and lists of typed items, dict, bool, int, float, str,
    None); an int-valued float becomes an int, a number a float, a string a float where a float is expected.

    Raises:
        TypeError / ValueError: `value` cannot be read as `hint`.
    """
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:  # exact type first, then conversions
            if arg is not type(None) and is_instance(value, arg):
                return convert(value, arg)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(value)
            items = [convert(v, a) for v, a in zip(value, args, strict=True)]
        else:
            items = [convert(v, args[0] if args else Any) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return dict(value)
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)  # YAML reads '1e-3' (no dot) as a string
        raise TypeError(value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError(value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise TypeError(value)


def is_instance(value: Any, hint: Any) -> bool:
    """Whether `value` is already of type `hint` (no conversion needed)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(hint, type) and isinstance(value, hint)


def describe(hint: Any) -> str:
    """`hint` in words, for messages: 'int or null', "one of 'val', 'holdout'", 'list of [float, float]'."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin in (tuple, list):
        args = typing.get_args(hint)
        inner = ", ".join(describe(a) for a in args if a is not Ellipsis)
        return f"list of [{inner}]"
    return getattr(hint, "__name__", str(hint))
