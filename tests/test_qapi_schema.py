"""The schema reader and the code generator (qsd.qapi.schema, qsd.qapi.codegen)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsd.qapi.codegen import Generator, attr_name, camel, enum_member_name
from qsd.qapi.schema import Schema, SchemaError, parse_text


def load(tmp_path: Path, **files: str) -> Schema:
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    return Schema.load(tmp_path)


def test_parse_text_syntax() -> None:
    exprs = parse_text("# comment\n{ 'struct': 'A', # trailing\n  'data': { '*b': ['int'],"
                       " 'c': { 'type': 'bool', 'if': 'X' } }, 'x': true }\n", "f.json")
    assert exprs[0][0] == {"struct": "A", "data": {"*b": ["int"], "c": {"type": "bool",
                                                                        "if": "X"}},
                           "x": True}
    assert exprs[0][1].line == 2
    with pytest.raises(SchemaError, match="f.json:1: duplicate key 'a'"):
        parse_text("{ 'a': 'x', 'a': 'y' }", "f.json")
    with pytest.raises(SchemaError, match="stray"):
        parse_text('{ "a": 1 }', "f.json")


def test_module_order_is_include_preorder(tmp_path: Path) -> None:
    schema = load(
        tmp_path,
        **{"qapi-schema": "{ 'include': 'b.json' }\n{ 'include': 'a.json' }\n",
           "a": "{ 'command': 'in-a' }\n",
           "b": "{ 'include': 'a.json' }\n{ 'command': 'in-b' }\n",
           "z": "{ 'command': 'in-z' }\n"})
    assert list(schema.commands) == ["in-a", "in-b", "in-z"]
    assert [d.name for d in schema.entities()] == ["in-b", "in-a", "in-z"]


@pytest.mark.parametrize(("text", "message"), [
    ("{ 'struct': 'A', 'data': {} }\n{ 'enum': 'A', 'data': [] }", "'A' is already defined"),
    ("{ 'struct': 'A', 'base': 'B', 'data': {} }", "'B' is not a known struct"),
    ("{ 'include': 'nope.json' }", "can't read include file nope.json"),
    ("{ 'enum': 'E', 'data': ['x'] }\n{ 'struct': 'S', 'data': {} }\n"
     "{ 'union': 'U', 'base': { '*t': 'E' }, 'discriminator': 't', 'data': { 'x': 'S' } }",
     "discriminator 't' must be a mandatory base member"),
    ("{ 'enum': 'E', 'data': ['x'] }\n{ 'struct': 'S', 'data': {} }\n"
     "{ 'union': 'U', 'base': { 't': 'E' }, 'discriminator': 't', 'data': { 'y': 'S' } }",
     "'y' is not a value of E"),
    ("{ 'command': 'c', 'data': 'Nope' }", "'Nope' is not a known struct or union"),
    ("{ 'frobnicate': 'x' }", "unknown expression"),
])
def test_schema_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        load(tmp_path, s=text)


def test_python_names() -> None:
    assert camel("block-export-del") == "BlockExportDel"
    assert camel("qmp_capabilities") == "QmpCapabilities"
    assert camel("BLOCK_EXPORT_DELETED") == "BlockExportDeleted"
    assert camel("x-blockdev-set-iothread") == "XBlockdevSetIothread"
    assert attr_name("node-name") == "node_name"
    assert attr_name("in") == "in_"
    assert attr_name("model_construct") == "model_construct_"   # a QAPIModel method
    assert attr_name("model_fields_set") == "model_fields_set_"
    assert attr_name("copy") == "copy"
    assert enum_member_name("vhost-user-blk") == "vhost_user_blk"
    assert enum_member_name("split") == "split_"  # a str method
    assert enum_member_name("9p") == "_9p"


def test_introspection_masks_and_numbers_like_qemu(tmp_path: Path) -> None:
    schema = load(tmp_path, s=(
        "{ 'enum': 'E', 'data': ['a', { 'name': 'b', 'features': ['deprecated'] }] }\n"
        "{ 'struct': 'S', 'data': { 'e': 'E', '*n': 'uint8', 'l': ['size'] } }\n"
        "{ 'command': 'c', 'data': { 's': 'S' }, 'returns': ['S'], 'allow-oob': true }\n"
        "{ 'event': 'EV' }\n"))
    trees = Generator(schema).introspection()
    assert trees == [
        {"name": "c", "meta-type": "command", "arg-type": "0", "ret-type": "[1]",
         "allow-oob": True},
        {"name": "EV", "meta-type": "event", "arg-type": "2"},
        {"name": "0", "meta-type": "object", "members": [{"name": "s", "type": "1"}]},
        {"name": "[1]", "meta-type": "array", "element-type": "1"},
        {"name": "1", "meta-type": "object", "members": [
            {"name": "e", "type": "3"}, {"name": "n", "type": "int", "default": None},
            {"name": "l", "type": "[int]"}]},
        {"name": "2", "meta-type": "object", "members": []},
        {"name": "3", "meta-type": "enum",
         "members": [{"name": "a"}, {"name": "b", "features": ["deprecated"]}],
         "values": ["a", "b"]},
        {"name": "int", "meta-type": "builtin", "json-type": "int"},
        {"name": "[int]", "meta-type": "array", "element-type": "int"},
    ]
