"""The hand-written base of the generated QAPI models and their metadata types.

The generated classes carry the schema facts the validator needs (member order,
wire names, QAPI types, union tags) as class variables, so validation follows the
schema exactly without asking pydantic to reproduce QEMU's visiting order.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict


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


class QAPIModel(BaseModel):
    """Base of every generated struct and union class.

    Instances are normally built by `qsd.qapi.parse_type`/`parse_command_args`, which
    validate with QEMU's rules and texts; direct construction (``Foo(node_name=...)``)
    goes through pydantic and is meant for code that builds replies or tests.
    """

    model_config = ConfigDict(populate_by_name=True, extra="forbid", protected_namespaces=())

    #: Members in QAPI visiting order (base first).
    __qapi_members__: ClassVar[tuple[MemberSpec, ...]] = ()
    #: For a union: the discriminator's wire name, and the class for each tag value.
    __qapi_tag__: ClassVar[str | None] = None
    __qapi_variants__: ClassVar[dict[str, type[QAPIModel]]] = {}
