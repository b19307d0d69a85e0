"""Typed conversion between plain mappings (parsed YAML) and frozen dataclasses.

:func:`from_mapping` builds a dataclass from a mapping, checking every value against the field's
annotation and naming the offending key (``optim.lr``) in the error; :func:`to_plain` turns a
dataclass back into YAML-able values (enums by value, tuples as lists). Supported annotations:
``bool``, ``int``, ``float`` (finite; also written as a fraction such as ``"2/255"``),
``str``, ``Enum`` (by value or name), ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``Mapping[str, Any]``, nested dataclasses and unions of dataclasses (the mapping names its
class under ``type``). A nested mapping changes the field's default value key by key: the keys it
leaves out keep that default's values (``attack: {steps: 40}`` keeps the rest of a loss's default
attack), unless it names another class under ``type``, whose own defaults then apply.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar, Union

__all__ = ["ConfigError", "from_mapping", "to_plain"]

T = TypeVar("T")
_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range; the message names
    the key."""


def _name(path: str) -> str:
    return path if path else "<top level>"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(annotation: Any, value: Any, path: str, default: Any = None) -> Any:
    # ``default``: the field's default value, which a nested mapping updates key by key.
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{_name(path)}: a value is required, got null")
        candidates = [option for option in options if option is not type(None)]
        classes = [option for option in candidates if dataclasses.is_dataclass(option)]
        if classes and len(classes) == len(candidates):
            return _tagged(classes, value, path, default)
        errors = []
        for option in candidates:
            try:
                return _convert(option, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{_name(path)}: {_describe(value)} matches none of "
                          f"{' | '.join(_type_name(o) for o in candidates)}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{_name(path)}: expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{_name(path)}: expected a list of {len(args)} values, "
                              f"got {len(value)}")
        return tuple(_convert(a, item, f"{path}[{i}]")
                     for i, (a, item) in enumerate(zip(args, value, strict=True)))
    if origin in (Mapping, dict, typing.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_name(path)}: expected a mapping, got {_describe(value)}")
        return {str(key): item for key, item in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_name(path)}: expected true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_name(path)}: expected an integer, got {_describe(value)}")
        return value
    if annotation is float:
        return _float(value, path)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_name(path)}: expected a string, got {_describe(value)}")
        return value
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return _enum(annotation, value, path)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _from_mapping(annotation, value, path, default)
    raise ConfigError(f"{_name(path)}: values of type {_type_name(annotation)} cannot be set "
                      "from a config file")


def _float(value: Any, path: str) -> float:
    # Every float of a config is finite: NaN passes range checks such as `x < 0` unnoticed
    # (a NaN grad_clip silently disabled clipping) and no setting means anything at infinity.
    if isinstance(value, str):
        match = _FRACTION.match(value)
        try:
            if match is None:
                raise ValueError(value)
            numerator, denominator = float(match.group(1)), float(match.group(2))
        except ValueError:
            raise ConfigError(f"{_name(path)}: expected a number (or a fraction such as "
                              f"2/255), got {_describe(value)}") from None
        if denominator == 0:
            raise ConfigError(f"{_name(path)}: {value!r} divides by zero; write a number or a "
                              "fraction such as 2/255")
        number = numerator / denominator
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{_name(path)}: expected a number, got {_describe(value)}")
    else:
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{_name(path)}: expected a finite number, got {value!r}")
    return number


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _enum(kind: type[Enum], value: Any, path: str) -> Enum:
    if isinstance(value, kind):
        return value
    for member in kind:
        if value == member.value or (isinstance(value, str) and value.upper() == member.name):
            return member
    known = ", ".join(str(member.value) for member in kind)
    raise ConfigError(f"{_name(path)}: {value!r} is not one of: {known}")


def _tagged(classes: list[Any], value: Any, path: str, default: Any = None) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    if not isinstance(value, Mapping) or "type" not in value:
        names = ", ".join(c.__name__ for c in classes)
        raise ConfigError(f"{_name(path)}: expected a mapping with `type:` one of {names}")
    chosen = [c for c in classes if c.__name__ == value["type"]]
    if not chosen:
        names = ", ".join(c.__name__ for c in classes)
        raise ConfigError(f"{_name(path)}.type: {value['type']!r} is not one of {names}")
    rest = {key: item for key, item in value.items() if key != "type"}
    return _from_mapping(chosen[0], rest, path, default)


def from_mapping(cls: type[T], data: Any, path: str = "") -> T:
    """Build the dataclass ``cls`` from ``data`` (a mapping, or ``None`` for all defaults).

    Missing keys keep their defaults; in a nested mapping, the defaults of the field's default
    value (see the module docstring). The dataclass's own ``__post_init__`` checks (ranges)
    run too; their ``ValueError``/``TypeError`` is re-raised as :class:`ConfigError` prefixed
    with the key.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value out of range.
    """
    return _from_mapping(cls, data, path, None)


def _field_default(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None


def _from_mapping(cls: type[T], data: Any, path: str, base: Any) -> T:
    # ``base``: a value of exactly ``cls`` whose fields stand in for the keys ``data`` omits.
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_name(path)}: expected a mapping, got {_describe(data)}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [str(key) for key in data if key not in fields]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; known keys{' of ' + path if path else ''}: "
            f"{', '.join(fields)}"
        )
    base = base if type(base) is cls else None
    values = {
        name: _convert(hints[name], data[name], f"{path}.{name}" if path else name,
                       _nested_default(base, fields[name], data[name]))
        for name in fields if name in data
    }
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        # At the top level the dataclass's own message names the keys.
        raise ConfigError(f"{path}: {error}" if path else str(error)) from error


def _nested_default(base: Any, item: dataclasses.Field[Any], value: Any) -> Any:
    """The default a nested mapping ``value`` for the field ``item`` updates: that field of
    ``base`` when there is one, else the field's own default; ``None`` for other values."""
    if not isinstance(value, Mapping):
        return None
    default = getattr(base, item.name) if base is not None else _field_default(item)
    return default if dataclasses.is_dataclass(default) and not isinstance(default, type) else None


def _is_dataclass_union(annotation: Any) -> bool:
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return False
    options = [o for o in typing.get_args(annotation) if o is not type(None)]
    return len(options) > 1 and all(dataclasses.is_dataclass(o) for o in options)


def to_plain(value: Any) -> Any:
    """YAML-able plain values: dataclasses -> dicts (unions tagged with ``type``), enums -> their
    values, tuples -> lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = typing.get_type_hints(type(value))
        plain = {}
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            item = getattr(value, f.name)
            converted = to_plain(item)
            if _is_dataclass_union(hints[f.name]) and isinstance(converted, dict):
                converted = {"type": type(item).__name__, **converted}
            plain[f.name] = converted
        return plain
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    return value
