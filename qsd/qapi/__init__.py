"""The QAPI layer: validation with QEMU's rules and texts, introspection, wire form.

Everything above this package sees generated models (`qsd.qapi.generated`) and
`QMPError`s.  See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import copy
import enum
from typing import Any

from qsd.errors import QMPError
from qsd.qapi import generated
from qsd.qapi.base import BUILTIN_TYPES, CommandInfo, QAPIModel
from qsd.qapi.hashorder import first_unvisited
from qsd.qapi.visitor import Visitor

__all__ = [
    "CommandInfo",
    "command_info",
    "command_names",
    "parse_command_args",
    "parse_type",
    "present_members",
    "schema_introspection",
    "to_wire",
]


def command_info(name: str) -> CommandInfo | None:
    """The schema's facts about a command, None if the schema has no such command."""
    return generated.COMMANDS.get(name)


def command_names() -> list[str]:
    """Every command of the schema, in schema order."""
    return list(generated.COMMANDS)


def parse_command_args(command: str, arguments: dict[str, Any]) -> QAPIModel | None:
    """Validates a command's 'arguments' like QEMU's generated marshaller.

    Returns the argument model (the data type itself for boxed commands), or None
    for a command without 'data'; raises QMPError with QEMU's text otherwise.
    """
    info = generated.COMMANDS.get(command)
    if info is None:
        raise QMPError(f"The command {command} has not been found", "CommandNotFound")
    if info.arg_type is None:
        # QEMU visits an empty struct, so any member given is unexpected.
        if arguments:
            key = first_unvisited(arguments, ()) or next(iter(arguments))
            raise QMPError(f"Parameter '{key}' is unexpected")
        return None
    result = Visitor(keyval=False).visit(info.arg_type, None, arguments)
    assert isinstance(result, QAPIModel)
    return result


def parse_type(type_name: str, value: object, *, keyval: bool = False,
               name: str | None = None) -> Any:
    """Validates `value` as QAPI type `type_name` (a struct, union, alternate, enum,
    builtin or '[Elem]' array) and returns the model or Python value.

    With keyval=True the value comes from QEMU's keyval command-line syntax: scalars
    are strings converted per schema type, with QEMU's keyval error texts.  `name` is
    what errors call the value itself (a QOM property's name; members are 'name.x').
    """
    if (not type_name.startswith("[") and type_name not in generated.TYPES
            and type_name not in generated.ALTERNATES and type_name not in BUILTIN_TYPES):
        raise KeyError(f"unknown QAPI type {type_name!r}")
    return Visitor(keyval=keyval).visit(type_name, name, value)


def schema_introspection() -> list[dict[str, object]]:
    """query-qmp-schema's reply (a fresh copy the caller may keep or change)."""
    from qsd.qapi.introspection import SCHEMA  # big, and asked for rarely

    return copy.deepcopy(SCHEMA)


def present_members(model: QAPIModel) -> list[tuple[str, Any]]:
    """(wire name, value) of the members a struct was given, in schema order."""
    result = []
    for member in type(model).__qapi_members__:
        if member.attr not in model.model_fields_set:
            continue
        value = getattr(model, member.attr)
        if value is None and member.optional and member.type not in ("null", "any"):
            continue    # None is how Python spells "absent" for these
        result.append((member.wire, value))
    return result


def to_wire(model: Any) -> Any:
    """A model (or list/enum/scalar holding models) back in wire form.

    Struct members come out in schema order under their wire names; members that
    were never set are left out, as QEMU's output visitor leaves out absent optional
    members.
    """
    if isinstance(model, QAPIModel):
        return {wire: to_wire(value) for wire, value in present_members(model)}
    if isinstance(model, enum.Enum):
        return model.value
    if isinstance(model, list):
        return [to_wire(item) for item in model]
    if isinstance(model, dict):
        return {key: to_wire(item) for key, item in model.items()}
    return model
