"""The command registry against the schema: every command has exactly one typed handler.

A schema command without a handler would be listed by query-qmp-schema but answer
CommandNotFound; a handler without a schema command could never be reached. Both
directions are checked, and each handler's ``args`` must be the generated model the
dispatcher passes (or None for commands without arguments).
"""

from __future__ import annotations

import inspect
import sys

import pytest

from qsd import qapi
from qsd.commands.registry import load_all
from qsd.qapi import generated

HANDLERS = load_all()


def test_every_schema_command_has_a_handler() -> None:
    assert sorted(set(qapi.command_names()) - set(HANDLERS)) == []


def test_every_handler_has_a_schema_command() -> None:
    assert sorted(set(HANDLERS) - set(qapi.command_names())) == []


@pytest.mark.parametrize("name", sorted(HANDLERS))
def test_handler_takes_the_generated_argument_model(name: str) -> None:
    handler = HANDLERS[name]
    info = qapi.command_info(name)
    assert info is not None
    annotation = inspect.signature(handler).parameters["args"].annotation
    assert isinstance(annotation, str), "handler modules use postponed annotations"
    resolved = eval(annotation, vars(sys.modules[handler.__module__]))
    if info.arg_type is None:
        assert resolved is None
    else:
        assert resolved is generated.TYPES[info.arg_type]
