"""Typed settings: dataclass fields with help and choices, their checks, and their CLI flags (e4srec.settings has the stages')."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from typing import Any, TypeVar

from e4srec.errors import E4SRecError

T = TypeVar("T")


def option(default: Any, help: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a default, a help text and optional choices (shown by `--help`)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def field_type(cls: type, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    if typing.get_origin(tp) in (list, tuple):
        return typing.get_origin(tp)
    return tp


def check_fields(obj: Any) -> None:
    """Raise E4SRecError for a field whose value is not among its declared choices, a float field
    that is NaN or infinite, a seed outside numpy's [0, 2**32) or a type that is not the declared one."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        name = f"{type(obj).__name__}.{f.name}"
        tp = field_type(type(obj), f)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if tp in (int, float, str, bool) and value is not None and type(value) is not tp:
            raise E4SRecError(f"{name}={value!r}: expected {tp.__name__}, got {type(value).__name__}")
        if choices and value not in choices:
            raise E4SRecError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        if tp is float and not math.isfinite(value):
            raise E4SRecError(f"{name}={value!r}: must be a finite number")
        if f.name == "seed" and not 0 <= value < 2**32:
            raise E4SRecError(f"{name}={value!r}: must be in [0, 2**32)")


def require(condition: bool, obj: Any, name: str, why: str) -> None:
    """Raise a one-line E4SRecError naming the config field when `condition` is false."""
    if not condition:
        raise E4SRecError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r}: {why}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--kebab-name` option per dataclass field, with its default and help text."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = field_type(cls, f)
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif tp in (list, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=f.default, help=help_text)
        else:
            parser.add_argument(
                flag, type=tp, default=f.default, choices=f.metadata.get("choices"), help=help_text
            )


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """Build the config from parsed arguments (the namespace never travels further than this)."""
    kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if field_type(cls, f) is tuple and kwargs[f.name] is not None:
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
