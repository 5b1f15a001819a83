"""The schema walker: node types that validate raw YAML values and build the typed ones.

A schema is a tree of nodes: ``Map`` (a mapping with known ``Field``s), ``List`` and the scalar
nodes (``Int``, ``Float``, ``Str``, ``Enum``, ``Path``...).  ``node.parse(value, path, ctx)``
checks a raw YAML value and returns the typed one, or raises ``ConfigError`` at the dotted key
path (``engine.servers[1].options[0].value``).  Each ``Field`` carries its YAML name, its raw
default (parsed by the same walker, so the defaults obey the same rules) and its hotness:
whether a reload applies it (``HOT``), applies it to new connections (``NEW_CONNS``) or needs a
restart (``COLD``); a field without one inherits its parent's.  The one table built from these
nodes is ``connmix_tx.config.schema._SCHEMA``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from connmix_tx import home
from connmix_tx.config.model import ConfigError, HostPort

REQUIRED = object()          # field default: the key must be present
# Hotness of a key (the "reload" column of docs/configuration.md); a field without one
# inherits its parent's.
HOT, NEW_CONNS, COLD = "hot", "new conns", "no"


def type_name(value: object) -> str:
    """The YAML type name used in "got ..." texts."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"),
                       (str, "string"), (list, "list"), (dict, "mapping")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def show(value: object) -> str:
    """A value as shown after "got" in a range or enum problem."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class Context:
    """State of one walk: where relative paths resolve, and the unused keys met so far."""

    def __init__(self, cwd: str | None) -> None:
        self.cwd = cwd
        self.unused: list[str] = []


class Node:
    """One kind of value in the schema; ``parse`` validates raw YAML and returns the typed value."""

    def parse(self, value: Any, path: str, ctx: Context) -> Any:
        raise NotImplementedError


def wrong_type(path: str, expected: str, value: object) -> ConfigError:
    return ConfigError(path, f"expected {expected}, got {type_name(value)}")


class Int(Node):
    """An integer (booleans and floats rejected) within optional bounds."""

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def parse(self, value: Any, path: str, ctx: Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong_type(path, "integer", value)
        low = self.minimum is not None and value < self.minimum
        high = self.maximum is not None and value > self.maximum
        if low or high:
            if self.maximum is not None:
                bounds = f" {self.minimum}-{self.maximum}"
            else:
                bounds = f" >= {self.minimum}"
            raise ConfigError(path, f"expected integer{bounds}, got {show(value)}")
        return value


class Float(Node):
    """A finite number (integers accepted) above ``minimum`` (strictly, unless ``inclusive``)."""

    def __init__(self, minimum: float, inclusive: bool = False) -> None:
        self.minimum, self.inclusive = minimum, inclusive

    def parse(self, value: Any, path: str, ctx: Context) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong_type(path, "number", value)
        ok = value >= self.minimum if self.inclusive else value > self.minimum
        if not ok or not math.isfinite(value):
            op = ">=" if self.inclusive else ">"
            expected = f"number {op} {show(self.minimum)}"
            raise ConfigError(path, f"expected {expected}, got {show(value)}")
        return float(value)


class Bool(Node):
    """A YAML boolean."""

    def parse(self, value: Any, path: str, ctx: Context) -> bool:
        if not isinstance(value, bool):
            raise wrong_type(path, "boolean", value)
        return value


class Str(Node):
    """A string, optionally required to be non-empty."""

    def __init__(self, non_empty: bool = False) -> None:
        self.non_empty = non_empty

    def parse(self, value: Any, path: str, ctx: Context) -> str:
        if not isinstance(value, str):
            raise wrong_type(path, "string", value)
        if self.non_empty and not value:
            raise ConfigError(path, "expected non-empty string, got ''")
        return value


class Enum(Node):
    """One of a fixed set of strings."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def parse(self, value: Any, path: str, ctx: Context) -> str:
        if not isinstance(value, str):
            raise wrong_type(path, "string", value)
        if value not in self.choices:
            expected = ", ".join(self.choices)
            raise ConfigError(path, f"expected one of {expected}, got {show(value)}")
        return value


class Path(Node):
    """A file path, made absolute with ``home.resolve_path`` (working directory, then home)."""

    def __init__(self, allow_empty: bool = False) -> None:
        self.text = Str(non_empty=not allow_empty)

    def parse(self, value: Any, path: str, ctx: Context) -> str:
        text = self.text.parse(value, path, ctx)
        return home.resolve_path(text, ctx.cwd) if text else ""


class HostPortNode(Node):
    """A ``host:port`` string."""

    def parse(self, value: Any, path: str, ctx: Context) -> HostPort:
        text = Str().parse(value, path, ctx)
        try:
            return HostPort.parse(text)
        except ValueError:
            raise ConfigError(path, f"expected host:port, got {show(text)}") from None


class Coerced(Node):
    """Any scalar but null, coerced to a string (``servers[].options[].value``)."""

    def parse(self, value: Any, path: str, ctx: Context) -> str:
        if value is None or isinstance(value, (list, dict)):
            raise wrong_type(path, "string", value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


class List(Node):
    """A list of ``item`` values, as a tuple; ``unique`` names an attribute that must not repeat."""

    def __init__(self, item: Node, unique: str | None = None) -> None:
        self.item, self.unique = item, unique

    def parse(self, value: Any, path: str, ctx: Context) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise wrong_type(path, "list", value)
        items: list[Any] = []
        for index, raw in enumerate(value):
            item = self.item.parse(raw, f"{path}[{index}]", ctx)
            if self.unique is not None:
                key = getattr(item, self.unique)
                if any(getattr(seen, self.unique) == key for seen in items):
                    problem = f"duplicate {self.unique} {show(key)}"
                    raise ConfigError(f"{path}[{index}].{self.unique}", problem)
            items.append(item)
        return tuple(items)


@dataclass(frozen=True)
class Field:
    """One key of a mapping: YAML name, value node, raw default and hotness (None: inherited)."""

    key: str
    node: Node
    default: Any
    hot: str | None = None
    keep: bool = True          # False: validated but not stored (compatibility sections)

    @property
    def attr(self) -> str:
        return re.sub(r"(?<!^)([A-Z])", r"_\1", self.key).lower()


class Map(Node):
    """A mapping with known keys; ``build(kwargs, path)`` turns the values into the section object.

    ``unused`` lists connmix keys accepted for compatibility: any scalar, recorded, not stored.
    A null mapping counts as an empty one (a section whose body is all commented out).
    """

    def __init__(self, build: Callable[..., Any] | None, fields: Iterable[Field] = (),
                 unused: Iterable[str] = ()) -> None:
        self.build = build
        self.fields = {f.key: f for f in fields}
        self.unused = frozenset(unused)

    def parse(self, value: Any, path: str, ctx: Context) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise wrong_type(path, "mapping", value)
        values: dict[str, Any] = {}
        for key, raw in value.items():
            sub = join(path, key)
            if key in self.unused:
                if isinstance(raw, (list, dict)):
                    raise wrong_type(sub, "scalar", raw)
                ctx.unused.append(sub)
                continue
            field = self.fields.get(key) if isinstance(key, str) else None
            if field is None:
                raise ConfigError(sub, "unknown key")
            if raw is None and field.default is None:
                values[key] = None      # explicit null on an optional section: absent
            else:
                values[key] = field.node.parse(raw, sub, ctx)
        for key, field in self.fields.items():
            if key in values:
                continue
            if field.default is REQUIRED:
                raise ConfigError(join(path, key), "missing required key")
            if field.default is None:
                values[key] = None
            else:
                values[key] = field.node.parse(field.default, join(path, key), ctx)
        if self.build is None:
            return None
        kwargs = {f.attr: values[k] for k, f in self.fields.items() if f.keep}
        if isinstance(self.build, type):
            return self.build(**kwargs)
        return self.build(kwargs, path)
