"""QEMU's QObject input visitor, over the generated models.

Validation walks the input the way QEMU's generated visitors drive
``qapi/qobject-input-visitor.c``: members in schema order (base first), the first
error wins, and members nobody asked for are reported when a struct ends (so the
innermost struct first).  Error texts and the names in them follow QEMU exactly:
most messages use the full path (``addr.path``, ``iothread[1]``, or ``iothread.1``
in keyval mode) while range, enum and alternate errors use just the member's own
name (``null`` for list elements), as QEMU does.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any

from qsd.errors import QMPError
from qsd.qapi import generated
from qsd.qapi.base import MemberSpec, QAPIModel
from qsd.qapi.hashorder import first_unvisited

INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": (-(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": (-(1 << 31), (1 << 31) - 1, "int32_t"),
    "uint8": (0, (1 << 8) - 1, "uint8_t"),
    "uint16": (0, (1 << 16) - 1, "uint16_t"),
    "uint32": (0, (1 << 32) - 1, "uint32_t"),
}
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
SIGNED = ("int", "int64", "int8", "int16", "int32")
UNSIGNED = ("uint64", "uint8", "uint16", "uint32")

# The patterns are compiled on first use (re's cache keeps them): a daemon's start
# rarely needs them, and compiling them all took almost 1 % of it.
# qemu_strtoi64()/qemu_strtou64() with base 0: C whitespace, a sign, then hex,
# octal or decimal digits, and nothing after them.
_C_INTEGER = r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z"
# qemu_strtosz(): decimal with an optional fraction and one-letter scale suffix,
# or plain hex (no fraction, no suffix).
_SIZE_DECIMAL = r"[ \t\n\v\f\r]*([0-9]*)(?:\.([0-9]*))?([bBkKmMgGtTpPeE]?)\Z"
_SIZE_HEX = r"[ \t\n\v\f\r]*0[xX]([0-9a-fA-F]+)\Z"
_SIZE_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
# qapi_bool_parse()
_BOOL_WORDS = {"on": True, "yes": True, "true": True, "y": True,
               "off": False, "no": False, "false": False, "n": False}
_C_FLOAT = (r"[ \t\n\v\f\r]*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
            r"|0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)"
            r"(?:[pP][+-]?[0-9]+)?|inf(?:inity)?|nan)\Z")


def parse_c_integer(text: str, *, unsigned: bool) -> int | None:
    """qemu_strtoi64/qemu_strtou64 (base 0); None where QEMU reports an error.

    Like strtoull, the unsigned form accepts a minus sign and wraps modulo 2**64.
    """
    m = re.match(_C_INTEGER, text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        magnitude = int(digits[2:], 16)
    elif digits.startswith("0") and len(digits) > 1:
        magnitude = int(digits[1:], 8)
    else:
        magnitude = int(digits)
    negative = m.group(1) == "-"
    if unsigned:
        if magnitude > UINT64_MAX:
            return None
        return (-magnitude) % (1 << 64) if negative else magnitude
    value = -magnitude if negative else magnitude
    return value if INT64_MIN <= value <= INT64_MAX else None


def parse_size(text: str) -> int | None:
    """qemu_strtosz(): '4096', '1.5M', '2g', '0x1000'; None where QEMU fails."""
    m = re.match(_SIZE_HEX, text)
    if m is not None:
        value = int(m.group(1), 16)
        return value if value <= UINT64_MAX else None
    m = re.match(_SIZE_DECIMAL, text)
    if m is None or not (m.group(1) or m.group(2)):
        return None
    whole, fraction, suffix = m.group(1), m.group(2), m.group(3).lower()
    if not whole and fraction is not None and not fraction:
        return None
    shift = _SIZE_SHIFT[suffix]
    value = int(whole or "0") << shift
    if fraction and int(fraction) and not shift:
        return None     # a fraction needs a scale suffix other than B
    if fraction:
        value += int((int(fraction) << shift) / 10 ** len(fraction) + 0.5)
    return value if value <= UINT64_MAX else None


class _Frame:
    """A dict or list being visited (QEMU's StackObject)."""

    __slots__ = ("name", "is_list", "index")

    def __init__(self, name: str | None, is_list: bool) -> None:
        self.name = name
        self.is_list = is_list
        self.index = -1


class Visitor:
    """Validates one value against one QAPI type and builds the models."""

    def __init__(self, keyval: bool) -> None:
        self.keyval = keyval
        self.stack: list[_Frame] = []

    # -- names ----------------------------------------------------------------

    def full_name(self, name: str | None) -> str:
        """QEMU's full_name(): the path of `name` inside the containers visited."""
        text = ""
        for frame in reversed(self.stack):
            if frame.is_list:
                text = (f".{frame.index}" if self.keyval else f"[{frame.index}]") + text
            else:
                text = "." + (name if name is not None else "<anonymous>") + text
            name = frame.name
        if name is not None:
            return name + text
        if text.startswith("."):
            return text[1:]
        return text or "<anonymous>"

    def type_error(self, name: str | None, expected: str) -> QMPError:
        return QMPError(f"Invalid parameter type for '{self.full_name(name)}', "
                        f"expected: {expected}")

    def value_error(self, name: str | None, expected: str) -> QMPError:
        return QMPError(f"Parameter '{self.full_name(name)}' expects {expected}")

    # -- dispatch on the schema type ------------------------------------------

    def visit(self, typ: str, name: str | None, value: object) -> Any:
        if typ.startswith("["):
            return self.visit_list(typ[1:-1], name, value)
        if typ == "str":
            return self.visit_str(name, value)
        if typ in SIGNED:
            return self.visit_int(typ, name, value)
        if typ in UNSIGNED or typ == "size":
            return self.visit_uint(typ, name, value)
        if typ == "bool":
            return self.visit_bool(name, value)
        if typ == "number":
            return self.visit_number(name, value)
        if typ == "any":
            return value
        if typ == "null":
            if value is not None:
                raise self.type_error(name, "null")
            return None
        if typ in generated.ALTERNATES:
            return self.visit_alternate(typ, name, value)
        cls = generated.TYPES[typ]
        if issubclass(cls, enum.Enum):
            return self.visit_enum(cls, name, value)
        assert issubclass(cls, QAPIModel)
        return self.visit_struct(cls, name, value)

    # -- containers ------------------------------------------------------------

    def visit_struct(self, cls: type[QAPIModel], name: str | None, value: object) -> QAPIModel:
        if not isinstance(value, dict):
            raise self.type_error(name, "object")
        self.stack.append(_Frame(name, False))
        unvisited = dict.fromkeys(value)
        visited: list[str] = []
        fields: dict[str, Any] = {}
        self.visit_members(cls.__qapi_members__, value, visited, fields)
        result_cls = cls
        if cls.__qapi_tag__ is not None:
            tag = value[cls.__qapi_tag__]
            variant = cls.__qapi_variants__.get(str(tag))
            if variant is not None:
                result_cls = variant
                branch = variant.__qapi_members__[len(cls.__qapi_members__):]
                self.visit_members(branch, value, visited, fields)
        for key in visited:
            del unvisited[key]
        if unvisited:
            key = next(iter(unvisited))
            if len(unvisited) > 1:
                key = first_unvisited(value, visited) or key
            raise QMPError(f"Parameter '{self.full_name(key)}' is unexpected")
        self.stack.pop()
        return result_cls.model_construct(**fields)

    def visit_members(self, members: tuple[MemberSpec, ...], value: dict[str, object],
                      visited: list[str], fields: dict[str, Any]) -> None:
        for member in members:
            if member.wire in value:
                visited.append(member.wire)
                fields[member.attr] = self.visit(member.type, member.wire, value[member.wire])
            elif not member.optional:
                raise QMPError(f"Parameter '{self.full_name(member.wire)}' is missing")

    def visit_list(self, element: str, name: str | None, value: object) -> list[Any]:
        if not isinstance(value, list):
            raise self.type_error(name, "array")
        frame = _Frame(name, True)
        self.stack.append(frame)
        result = []
        for item in value:
            frame.index += 1
            result.append(self.visit(element, None, item))
        self.stack.pop()
        return result

    def visit_alternate(self, typ: str, name: str | None, value: object) -> Any:
        """The branch is chosen by the value's JSON type alone, as QEMU's
        qobject_input_start_alternate() does (also on the command line, where a
        string picks the str/enum branch and a dict the struct branch)."""
        for _, branch in generated.ALTERNATES[typ]:
            if _matches(branch, value):
                return self.visit(branch, name, value)
        raise QMPError(f"Invalid parameter type for '{name if name is not None else 'null'}', "
                       f"expected: {typ}")

    # -- scalars ---------------------------------------------------------------

    def keyval_string(self, name: str | None, value: object) -> str:
        """qobject_input_get_keyval(): command-line scalars must be strings."""
        if isinstance(value, str):
            return value
        if isinstance(value, dict | list):
            raise QMPError(f"Parameters '{self.full_name(name)}.*' are unexpected")
        raise QMPError(f"Internal error: parameter {self.full_name(name)} invalid")

    def visit_str(self, name: str | None, value: object) -> str:
        if self.keyval:
            return self.keyval_string(name, value)
        if not isinstance(value, str):
            raise self.type_error(name, "string")
        return value

    def visit_int(self, typ: str, name: str | None, value: object) -> int:
        if self.keyval:
            parsed = parse_c_integer(self.keyval_string(name, value), unsigned=False)
            if parsed is None:
                raise self.value_error(name, "integer")
        else:
            if (not isinstance(value, int) or isinstance(value, bool)
                    or not INT64_MIN <= value <= INT64_MAX):
                raise self.type_error(name, "integer")
            parsed = value
        return self._range(typ, name, parsed)

    def visit_uint(self, typ: str, name: str | None, value: object) -> int:
        if self.keyval:
            text = self.keyval_string(name, value)
            if typ == "size":
                size = parse_size(text)
                if size is None:
                    raise self.value_error(name, "size")
                return size
            parsed = parse_c_integer(text, unsigned=True)
            if parsed is None:
                raise self.value_error(name, "integer")
        else:
            if (not isinstance(value, int) or isinstance(value, bool)
                    or not INT64_MIN <= value <= UINT64_MAX):
                raise self.value_error(name, "uint64")
            # QEMU accepts negative numbers for unsigned types "for backward
            # compatibility" and stores them modulo 2**64.
            parsed = value % (1 << 64)
        return self._range(typ, name, parsed)

    @staticmethod
    def _range(typ: str, name: str | None, value: int) -> int:
        limits = INT_RANGES.get(typ)
        if limits is not None and not limits[0] <= value <= limits[1]:
            raise QMPError(f"Parameter '{name if name is not None else 'null'}' "
                           f"expects {limits[2]}")
        return value

    def visit_bool(self, name: str | None, value: object) -> bool:
        if self.keyval:
            parsed = _BOOL_WORDS.get(self.keyval_string(name, value))
            if parsed is None:
                raise self.value_error(name, "'on' or 'off'")
            return parsed
        if not isinstance(value, bool):
            raise self.type_error(name, "boolean")
        return value

    def visit_number(self, name: str | None, value: object) -> float:
        if self.keyval:
            text = self.keyval_string(name, value)
            if re.match(_C_FLOAT, text, re.IGNORECASE) is None:
                raise self.type_error(name, "number")
            parsed = float.fromhex(text.strip()) if "x" in text.lower() else float(text)
            if not math.isfinite(parsed):
                raise self.type_error(name, "number")
            return parsed
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.type_error(name, "number")
        try:
            return float(value)
        except OverflowError:
            raise self.type_error(name, "number") from None

    def visit_enum(self, cls: type[enum.Enum], name: str | None, value: object) -> enum.Enum:
        text = self.visit_str(name, value)
        try:
            return cls(text)
        except ValueError:
            raise QMPError(f"Parameter '{name if name is not None else 'null'}' "
                           f"does not accept value '{text}'") from None


def _scalar_kind(typ: str) -> str:
    """The JSON kind a QAPI type takes on the wire (QEMU's alternate_qtype)."""
    if typ.startswith("["):
        return "list"
    if typ == "str":
        return "str"
    if typ in SIGNED or typ in UNSIGNED or typ == "size":
        return "int"
    if typ in ("bool", "number", "null", "any"):
        return typ
    cls = generated.TYPES[typ]
    return "str" if issubclass(cls, enum.Enum) else "dict"


def _matches(typ: str, value: object) -> bool:
    """Whether `value`'s JSON type selects the alternate branch `typ`."""
    kind = _scalar_kind(typ)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    # QEMU has one QNum type: an int branch also gets floats (and then fails).
    return isinstance(value, int | float) and not isinstance(value, bool)
