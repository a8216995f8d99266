"""Reads QAPI schema files (QEMU's syntax) into a checked, ordered model.

The generator (`scripts/qapi-gen`, see `qsd.qapi.codegen`) is the only user: the
daemon itself never parses the schema at run time, it imports the generated modules.
The syntax is QEMU's: Python-like literals with single-quoted strings, ``true`` and
``false``, and ``#`` comments.  ``'if'`` conditions are accepted and treated as true
because qsd has no build configurations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qsd.qapi.base import BUILTIN_TYPES

#: The JSON type of each builtin as introspection reports it (QEMU maps every
#: integer type to 'int').
BUILTIN_JSON_TYPES = {
    "str": "string", "number": "number", "bool": "boolean", "null": "null",
    "any": "value", "int": "int", "int8": "int", "int16": "int", "int32": "int",
    "int64": "int", "uint8": "int", "uint16": "int", "uint32": "int", "uint64": "int",
    "size": "int",
}


class SchemaError(Exception):
    """A schema file is malformed or inconsistent; the text names file and line."""


@dataclass(frozen=True)
class Info:
    """Where a definition came from, for error messages and module ordering."""

    fname: str
    line: int

    def __str__(self) -> str:
        return f"{self.fname}:{self.line}"


@dataclass
class Member:
    """A struct/union member or a command/event argument."""

    name: str
    type: str            # a type name; arrays are spelled "[Elem]"
    optional: bool
    features: list[str] = field(default_factory=list)


@dataclass
class EnumValue:
    name: str
    features: list[str] = field(default_factory=list)


@dataclass
class Definition:
    """Common part of every named schema entity."""

    name: str
    info: Info
    features: list[str]


@dataclass
class EnumDef(Definition):
    values: list[EnumValue]


@dataclass
class StructDef(Definition):
    """A struct, or an implicit one (command arguments, inline union base)."""

    base: str | None
    members: list[Member]
    implicit: bool = False


@dataclass
class UnionDef(Definition):
    """A flat union: base members (including the tag) plus one branch per tag value."""

    base: str                       # always a struct (possibly implicit)
    discriminator: str
    variants: list[tuple[str, str]]  # (tag value, branch struct)


@dataclass
class AlternateDef(Definition):
    variants: list[tuple[str, str]]  # (branch name, type)


@dataclass
class CommandDef(Definition):
    arg_type: str | None
    boxed: bool
    ret_type: str | None
    allow_oob: bool
    gen: bool


@dataclass
class EventDef(Definition):
    arg_type: str | None
    boxed: bool


TypeDef = EnumDef | StructDef | UnionDef | AlternateDef


_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+) | (?P<nl>\n) | (?P<comment>\#[^\n]*)
  | (?P<str>'(?:[^'\\\n]|\\.)*') | (?P<punct>[{}\[\]:,])
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE)


def parse_text(text: str, fname: str) -> list[tuple[dict[str, object], Info]]:
    """Top-level expressions of one schema file with the line each starts on."""
    tokens: list[tuple[str, object, int]] = []
    line = 1
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise SchemaError(f"{fname}:{line}: stray {text[pos]!r}")
        kind = m.lastgroup
        pos = m.end()
        if kind == "nl":
            line += 1
        elif kind == "str":
            tokens.append(("value", m.group()[1:-1].replace("\\'", "'"), line))
        elif kind == "punct":
            tokens.append((m.group(), None, line))
        elif kind == "word":
            word = m.group()
            if word not in ("true", "false"):
                raise SchemaError(f"{fname}:{line}: unexpected word {word!r}")
            tokens.append(("value", word == "true", line))
    exprs: list[tuple[dict[str, object], Info]] = []
    index = 0

    def value() -> object:
        nonlocal index
        if index >= len(tokens):
            raise SchemaError(f"{fname}: unexpected end of file")
        kind, val, at = tokens[index]
        index += 1
        if kind == "value":
            return val
        if kind == "{":
            obj: dict[str, object] = {}
            if tokens[index][0] == "}":
                index += 1
                return obj
            while True:
                key = value()
                if not isinstance(key, str):
                    raise SchemaError(f"{fname}:{at}: object keys must be strings")
                if tokens[index][0] != ":":
                    raise SchemaError(f"{fname}:{tokens[index][2]}: expected ':'")
                index += 1
                if key in obj:
                    raise SchemaError(f"{fname}:{at}: duplicate key {key!r}")
                obj[key] = value()
                sep = tokens[index][0]
                index += 1
                if sep == "}":
                    return obj
                if sep != ",":
                    raise SchemaError(f"{fname}:{tokens[index - 1][2]}: expected ',' or '}}'")
        if kind == "[":
            arr: list[object] = []
            if tokens[index][0] == "]":
                index += 1
                return arr
            while True:
                arr.append(value())
                sep = tokens[index][0]
                index += 1
                if sep == "]":
                    return arr
                if sep != ",":
                    raise SchemaError(f"{fname}:{tokens[index - 1][2]}: expected ',' or ']'")
        raise SchemaError(f"{fname}:{at}: unexpected {kind!r}")

    while index < len(tokens):
        at = tokens[index][2]
        expr = value()
        if not isinstance(expr, dict):
            raise SchemaError(f"{fname}:{at}: top-level expressions must be objects")
        exprs.append((expr, Info(fname, at)))
    return exprs


class Schema:
    """All definitions of a schema directory, in QEMU's visiting order.

    QEMU visits modules in the order the depth-first include walk first reaches
    them (a file before the files it includes), and a module's definitions in file
    order; the order matters for query-commands and query-qmp-schema's numbering.
    """

    def __init__(self) -> None:
        self.types: dict[str, TypeDef] = {}
        self.commands: dict[str, CommandDef] = {}
        self.events: dict[str, EventDef] = {}
        self._modules: dict[str, list[Definition]] = {}

    @classmethod
    def load(cls, directory: Path) -> Schema:
        schema = cls()
        exprs: list[tuple[dict[str, object], Info]] = []
        seen: set[Path] = set()

        def read(path: Path) -> None:
            seen.add(path)
            schema._modules.setdefault(path.name, [])
            for expr, info in parse_text(path.read_text(), path.name):
                if "include" in expr:
                    target = path.parent / str(expr["include"])
                    if not target.exists():
                        raise SchemaError(f"{info}: can't read include file {target.name}")
                    if target.resolve() not in {p.resolve() for p in seen}:
                        read(target)
                elif "pragma" not in expr:
                    exprs.append((expr, info))

        root = directory / "qapi-schema.json"
        if root.exists():
            read(root)
        for path in sorted(directory.glob("*.json")):
            if path.resolve() not in {p.resolve() for p in seen}:
                read(path)
        for expr, info in exprs:
            schema._define(expr, info)
        schema._check()
        return schema

    # -- definitions ---------------------------------------------------------

    def _add(self, definition: Definition) -> None:
        name = definition.name
        if name in self.types or name in self.commands or name in self.events:
            raise SchemaError(f"{definition.info}: '{name}' is already defined")
        if isinstance(definition, CommandDef):
            self.commands[name] = definition
        elif isinstance(definition, EventDef):
            self.events[name] = definition
        else:
            assert isinstance(definition, EnumDef | StructDef | UnionDef | AlternateDef)
            self.types[name] = definition
        self._modules.setdefault(definition.info.fname, []).append(definition)

    def _define(self, expr: dict[str, object], info: Info) -> None:
        features = _features(expr.get("features", []), info)
        if "enum" in expr:
            values = []
            for item in _list(expr["data"], info):
                if isinstance(item, dict):
                    values.append(EnumValue(str(item["name"]),
                                            _features(item.get("features", []), info)))
                else:
                    values.append(EnumValue(str(item)))
            self._add(EnumDef(str(expr["enum"]), info, features, values))
        elif "struct" in expr:
            base = expr.get("base")
            self._add(StructDef(str(expr["struct"]), info, features,
                                str(base) if base is not None else None,
                                _members(expr.get("data", {}), info)))
        elif "union" in expr:
            name = str(expr["union"])
            base = expr["base"]
            if isinstance(base, dict):
                base_name = f"q_obj_{name}-base"
                self._add(StructDef(base_name, info, [], None, _members(base, info),
                                    implicit=True))
            else:
                base_name = str(base)
            data = expr["data"]
            if not isinstance(data, dict):
                raise SchemaError(f"{info}: union '{name}' needs a 'data' object")
            variants = [(str(k), _type_name(v, info)) for k, v in data.items()]
            self._add(UnionDef(name, info, features, base_name,
                               str(expr["discriminator"]), variants))
        elif "alternate" in expr:
            data = expr["data"]
            if not isinstance(data, dict):
                raise SchemaError(f"{info}: alternate needs a 'data' object")
            self._add(AlternateDef(str(expr["alternate"]), info, features,
                                   [(str(k), _type_name(v, info)) for k, v in data.items()]))
        elif "command" in expr:
            name = str(expr["command"])
            self._add(CommandDef(name, info, features,
                                 self._arg_type(name, expr.get("data"), info),
                                 bool(expr.get("boxed", False)),
                                 _type_name(expr["returns"], info) if "returns" in expr
                                 else None,
                                 bool(expr.get("allow-oob", False)),
                                 bool(expr.get("gen", True))))
        elif "event" in expr:
            name = str(expr["event"])
            self._add(EventDef(name, info, features,
                               self._arg_type(name, expr.get("data"), info),
                               bool(expr.get("boxed", False))))
        else:
            raise SchemaError(f"{info}: unknown expression {sorted(expr)}")

    def _arg_type(self, owner: str, data: object, info: Info) -> str | None:
        if data is None:
            return None
        if isinstance(data, dict):
            implicit = f"q_obj_{owner}-arg"
            self._add(StructDef(implicit, info, [], None, _members(data, info), implicit=True))
            return implicit
        return str(data)

    # -- checks --------------------------------------------------------------

    def _check(self) -> None:
        for definition in self.types.values():
            info = definition.info
            if isinstance(definition, StructDef):
                if definition.base is not None:
                    self._need(definition.base, info, StructDef)
                for member in definition.members:
                    self._need_type(member.type, info)
            elif isinstance(definition, UnionDef):
                self._need(definition.base, info, StructDef)
                tag = next((m for m in self.all_members(definition.base)
                            if m.name == definition.discriminator), None)
                if tag is None or tag.optional:
                    raise SchemaError(f"{info}: discriminator '{definition.discriminator}' "
                                      "must be a mandatory base member")
                enum = self._need(tag.type, info, EnumDef)
                assert isinstance(enum, EnumDef)
                names = {v.name for v in enum.values}
                for value, branch in definition.variants:
                    if value not in names:
                        raise SchemaError(f"{info}: '{value}' is not a value of {enum.name}")
                    self._need(branch, info, StructDef)
            elif isinstance(definition, AlternateDef):
                for _, typ in definition.variants:
                    self._need_type(typ, info)
        for command in self.commands.values():
            if command.arg_type is not None:
                self._need(command.arg_type, command.info, StructDef, UnionDef)
            if command.ret_type is not None:
                self._need_type(command.ret_type, command.info)
        for event in self.events.values():
            if event.arg_type is not None:
                self._need(event.arg_type, event.info, StructDef, UnionDef)

    def _need_type(self, name: str, info: Info) -> None:
        name = element_name(name)
        if name not in BUILTIN_TYPES and name not in self.types:
            raise SchemaError(f"{info}: uses unknown type '{name}'")

    def _need(self, name: str, info: Info, *kinds: type) -> TypeDef:
        definition = self.types.get(name)
        if definition is None or not isinstance(definition, kinds):
            wanted = " or ".join(k.__name__.removesuffix("Def").lower() for k in kinds)
            raise SchemaError(f"{info}: '{name}' is not a known {wanted}")
        return definition

    # -- queries used by the code generator ----------------------------------

    def all_members(self, struct_name: str) -> list[Member]:
        """A struct's members with its base's first, i.e. in QAPI visiting order."""
        definition = self.types[struct_name]
        if isinstance(definition, UnionDef):
            return self.all_members(definition.base)
        assert isinstance(definition, StructDef)
        inherited = self.all_members(definition.base) if definition.base else []
        return inherited + definition.members

    def entities(self) -> list[Definition]:
        """Every definition in QEMU's visiting order (module by module)."""
        return [d for defs in self._modules.values() for d in defs]


def element_name(name: str) -> str:
    """The element type of an array type name, else the name itself."""
    return name[1:-1] if name.startswith("[") else name


def _list(value: object, info: Info) -> list[object]:
    if not isinstance(value, list):
        raise SchemaError(f"{info}: expected a list")
    return value


def _features(value: object, info: Info) -> list[str]:
    return [str(f["name"]) if isinstance(f, dict) else str(f) for f in _list(value, info)]


def _type_name(value: object, info: Info) -> str:
    if isinstance(value, dict):
        return _type_name(value["type"], info)
    if isinstance(value, list):
        if len(value) != 1:
            raise SchemaError(f"{info}: array types have exactly one element type")
        return f"[{_type_name(value[0], info)}]"
    if not isinstance(value, str):
        raise SchemaError(f"{info}: a type must be a name, [name] or an object with 'type'")
    return value


def _members(data: object, info: Info) -> list[Member]:
    if not isinstance(data, dict):
        raise SchemaError(f"{info}: members must be an object")
    members = []
    for key, value in data.items():
        optional = key.startswith("*")
        features = _features(value.get("features", []), info) if isinstance(value, dict) else []
        members.append(Member(key.removeprefix("*"), _type_name(value, info), optional,
                              features))
    return members
