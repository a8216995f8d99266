"""The hand-written base of the generated QAPI models and their metadata types.

The generated classes carry the schema facts the validator needs (member order,
wire names, QAPI types, union tags) as class variables, so validation follows the
schema exactly, in QEMU's visiting order.
"""

from __future__ import annotations

import enum
import threading
from typing import Any, ClassVar, NamedTuple, Self, cast

BUILTIN_TYPES = (
    "str", "number", "int", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "size", "bool", "null", "any",
)


class MemberSpec(NamedTuple):
    """One member as the input visitor sees it."""

    wire: str        # name on the wire ('node-name')
    attr: str        # Python attribute ('node_name')
    type: str        # QAPI type name; arrays spelled '[Elem]'
    optional: bool


class CommandInfo(NamedTuple):
    """What the dispatcher needs to know about a QMP command.

    (Not to be confused with the QAPI struct `qsd.qapi.generated.CommandInfo`, the
    element type of query-commands' reply.)
    """

    name: str
    arg_type: str | None    # the model validating the arguments, None without 'data'
    boxed: bool
    allow_oob: bool
    ret_type: str | None
    features: tuple[str, ...]

    @property
    def has_args(self) -> bool:
        return self.arg_type is not None


class QAPIModel:
    """Base of every generated struct and union class.

    Instances are normally built by `qsd.qapi.parse_type`/`parse_command_args`, which
    validate with QEMU's rules and texts and then call `model_construct`. Direct
    construction (``Foo(node_name=..., **{"wire-name": ...})``) is for code that builds
    replies and for tests: it checks member names and presence, not types.

    The classes are plain Python so that creating them costs next to nothing at start-up;
    everything the schema says about them was worked out when they were generated.
    """

    #: Members in QAPI visiting order (base first).
    __qapi_members__: ClassVar[tuple[MemberSpec, ...]] = ()
    #: For a union: the discriminator's wire name, and the class for each tag value.
    __qapi_tag__: ClassVar[str | None] = None
    __qapi_variants__: ClassVar[dict[str, type[QAPIModel]]] = {}

    #: The members that were given (absent optional members read as None).
    model_fields_set: set[str]

    def __init__(self, **values: Any) -> None:
        given: dict[str, Any] = {}
        by_wire = {member.wire: member.attr for member in self.__qapi_members__}
        known = set(by_wire.values())
        for key, value in values.items():
            attr = key if key in known else by_wire.get(key)
            if attr is None:
                raise TypeError(f"{type(self).__name__} has no member {key!r}")
            given[attr] = value
        for member in self.__qapi_members__:
            if not member.optional and member.attr not in given:
                raise TypeError(f"{type(self).__name__} needs member {member.wire!r}")
        self.__dict__.update(given)
        self.model_fields_set = set(given)

    @classmethod
    def model_construct(cls, **values: Any) -> Self:
        """An instance of already validated members, by attribute name."""
        model = cls.__new__(cls)
        model.__dict__.update(values)
        model.model_fields_set = set(values)
        return model

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name != "model_fields_set":
            self.model_fields_set.add(name)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, QAPIModel)
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        members = ", ".join(f"{member.attr}={getattr(self, member.attr)!r}"
                            for member in self.__qapi_members__
                            if member.attr in self.model_fields_set)
        return f"{type(self).__name__}({members})"


class TypeTable(dict[str, type]):
    """The generated ``TYPES``: every enum, struct and union class by QAPI name.

    Enum classes are made the first time they are looked up: creating an enum costs
    several times what a plain class does, and a daemon's start needs a few of them.
    ``name in table`` holds for those not made yet, too.
    """

    def __init__(self, classes: dict[str, type],
                 enums: dict[str, tuple[tuple[str, str], ...]], module: str) -> None:
        super().__init__(classes)
        self._enums = enums     # enum name -> its (Python name, wire value) members
        self._module = module
        self._lock = threading.Lock()   # so that every thread gets the same class

    def __missing__(self, name: str) -> type:
        members = self._enums[name]
        with self._lock:
            if not dict.__contains__(self, name):
                # The functional form makes a class (the type checker reads it as a lookup).
                self[name] = cast(type, enum.StrEnum(name, members, module=self._module,
                                                     qualname=name))
            return dict.__getitem__(self, name)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in self._enums
