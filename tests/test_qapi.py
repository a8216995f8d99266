"""qsd.qapi: QEMU's validation rules and error texts, keyval conversion, wire form.

The expected texts were checked against QEMU's qobject-input-visitor and Debian's
qemu-storage-daemon (where 7.2 and 11.1 agree).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd import qapi
from qsd.errors import QMPError
from qsd.qapi import generated as g
from qsd.qapi.visitor import parse_c_integer, parse_size


def error_of(command: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(QMPError) as info:
        qapi.parse_command_args(command, arguments)
    assert info.value.error_class == "GenericError"
    return info.value.desc


def keyval_error(type_name: str, value: object) -> str:
    with pytest.raises(QMPError) as info:
        qapi.parse_type(type_name, value, keyval=True)
    return info.value.desc


FUSE = {"type": "fuse", "id": "e0", "node-name": "n0", "mountpoint": "/m"}
NBD = {"type": "nbd", "id": "e0", "node-name": "n0"}


# -- successful parses ---------------------------------------------------------


def test_union_variant_is_branch_subclass() -> None:
    opts = qapi.parse_command_args("block-export-add", {**FUSE, "writable": True})
    assert isinstance(opts, g.BlockExportOptionsFuse)
    assert isinstance(opts, g.BlockExportOptions)
    assert opts.type == "fuse" and opts.type is g.BlockExportType.fuse
    assert (opts.id, opts.node_name, opts.mountpoint, opts.writable) == ("e0", "n0", "/m", True)
    assert opts.growable is None and opts.iothread is None


def test_alternate_branches() -> None:
    single = qapi.parse_type("BlockExportOptions", {**FUSE, "iothread": "io0"})
    multi = qapi.parse_type("BlockExportOptions", {**FUSE, "iothread": ["io0", "io1"]})
    assert single.iothread == "io0"
    assert multi.iothread == ["io0", "io1"]
    bitmaps = qapi.parse_type("BlockExportOptions",
                              {**NBD, "bitmaps": ["b0", {"node": "n1", "name": "b1"}]})
    assert bitmaps.bitmaps[0] == "b0"
    assert isinstance(bitmaps.bitmaps[1], g.BlockDirtyBitmap)


def test_command_args_classes() -> None:
    args = qapi.parse_command_args("block-export-del", {"id": "e0", "mode": "hard"})
    assert isinstance(args, g.BlockExportDelArgs)
    assert args.mode == "hard"
    caps = qapi.parse_command_args("qmp_capabilities", {"enable": ["oob"]})
    assert isinstance(caps, g.QmpCapabilitiesArgs) and caps.enable == ["oob"]
    start = qapi.parse_command_args(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/s"}}})
    assert isinstance(start, g.NbdServerStartArgs)
    assert isinstance(start, g.NbdServerOptionsLegacy)
    assert isinstance(start.addr, g.UnixSocketAddressWrapper)
    assert start.addr.data.path == "/s"
    assert qapi.parse_command_args("query-version", {}) is None
    obj = qapi.parse_command_args("object-add", {"qom-type": "iothread", "id": "io0",
                                                 "poll-max-ns": 0})
    assert isinstance(obj, g.IothreadProperties) and obj.poll_max_ns == 0


def test_command_info() -> None:
    info = qapi.command_info("block-export-add")
    assert info is not None
    assert (info.name, info.boxed, info.allow_oob, info.has_args) == (
        "block-export-add", True, False, True)
    quit_info = qapi.command_info("quit")
    assert quit_info is not None and not quit_info.has_args
    assert qapi.command_info("no-such-command") is None
    names = qapi.command_names()
    assert names.index("block-export-add") < names.index("qmp_capabilities")
    assert {"query-qmp-schema", "chardev-add", "object-del", "nbd-server-stop"} <= set(names)


def test_unknown_command() -> None:
    with pytest.raises(QMPError) as info:
        qapi.parse_command_args("nope", {})
    assert info.value.error_class == "CommandNotFound"


# -- QMP error texts -----------------------------------------------------------


@pytest.mark.parametrize(("command", "arguments", "desc"), [
    ("block-export-del", {}, "Parameter 'id' is missing"),
    ("block-export-del", {"id": "e", "x": 1}, "Parameter 'x' is unexpected"),
    ("block-export-del", {"id": 1}, "Invalid parameter type for 'id', expected: string"),
    ("block-export-del", {"id": None}, "Invalid parameter type for 'id', expected: string"),
    ("block-export-del", {"id": "e", "mode": "soft"},
     "Parameter 'mode' does not accept value 'soft'"),
    ("block-export-del", {"id": "e", "mode": 1},
     "Invalid parameter type for 'mode', expected: string"),
    ("quit", {"a": 1}, "Parameter 'a' is unexpected"),
    ("query-version", {"a": 1}, "Parameter 'a' is unexpected"),
    ("qmp_capabilities", {"enable": "oob"},
     "Invalid parameter type for 'enable', expected: array"),
    ("qmp_capabilities", {"enable": [1]},
     "Invalid parameter type for 'enable[0]', expected: string"),
    ("qmp_capabilities", {"enable": ["oob", "x"]}, "Parameter 'null' does not accept value 'x'"),
    ("block-export-add", {**NBD, "type": "x"}, "Parameter 'type' does not accept value 'x'"),
    ("block-export-add", {"id": "e"}, "Parameter 'type' is missing"),
    ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n"},
     "Parameter 'mountpoint' is missing"),
    ("block-export-add", {**FUSE, "writable": "yes"},
     "Invalid parameter type for 'writable', expected: boolean"),
    ("block-export-add", {**FUSE, "iothread": 1},
     "Invalid parameter type for 'iothread', expected: BlockExportIothreads"),
    ("block-export-add", {**FUSE, "iothread": ["a", 1]},
     "Invalid parameter type for 'iothread[1]', expected: string"),
    ("block-export-add", {**FUSE, "allow-other": "x"},
     "Parameter 'allow-other' does not accept value 'x'"),
    ("block-export-add", {**NBD, "bitmaps": ["a", 3]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("block-export-add", {**NBD, "bitmaps": ["a", {"node": "x"}]},
     "Parameter 'bitmaps[1].name' is missing"),
    ("block-export-add", {**NBD, "mountpoint": "/m"}, "Parameter 'mountpoint' is unexpected"),
    ("nbd-server-start", {}, "Parameter 'addr' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {}}},
     "Parameter 'addr.data.path' is missing"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "foo": 1}}, "bar": 1},
     "Parameter 'addr.data.foo' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x"}, "zz": 1}, "bar": 1},
     "Parameter 'addr.zz' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": 1}}},
     "Invalid parameter type for 'addr.data.port', expected: string"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "1",
                                                            "to": -1}}},
     "Parameter 'to' expects uint16_t"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "1",
                                                            "to": 1.0}}},
     "Parameter 'addr.data.to' expects uint64"),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": "1",
                                                            "to": 1 << 64}}},
     "Parameter 'addr.data.to' expects uint64"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x"}},
                          "max-connections": -1},
     "Parameter 'max-connections' expects uint32_t"),
    ("nbd-server-start", {"addr": "unix"}, "Invalid parameter type for 'addr', expected: object"),
    ("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": 1.5},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": 1 << 63},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": True},
     "Invalid parameter type for 'poll-max-ns', expected: integer"),
    ("object-add", {"qom-type": "nope", "id": "x"},
     "Parameter 'qom-type' does not accept value 'nope'"),
    ("chardev-add", {"id": "c", "backend": {"type": "socket", "data": {}}},
     "Parameter 'backend.data.addr' is missing"),
    ("chardev-add", {"id": "c", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": "/x"}}, "server": "on"}}},
     "Invalid parameter type for 'backend.data.server', expected: boolean"),
])
def test_qmp_error_texts(command: str, arguments: dict[str, Any], desc: str) -> None:
    assert error_of(command, arguments) == desc


def test_first_error_wins_in_schema_order() -> None:
    # 'id' comes before 'node-name' in the base; the branch comes after the base;
    # unexpected members are only reported once all members were visited.
    assert error_of("block-export-add", {"type": "fuse", "node-name": 1, "id": 2}) == \
        "Invalid parameter type for 'id', expected: string"
    assert error_of("block-export-add", {**FUSE, "zzz": 1, "mountpoint": 5}) == \
        "Invalid parameter type for 'mountpoint', expected: string"
    assert error_of("block-export-add", {"zzz": 1, "type": "nbd", "id": "e"}) == \
        "Parameter 'node-name' is missing"


@pytest.mark.parametrize(("command", "arguments", "desc"), [
    # Observed from qemu-storage-daemon: with several unexpected members QEMU names
    # the first in GLib hash table order, not input order.
    ("block-export-del", {"id": "e", "zzz": 1, "aaa": 2}, "Parameter 'zzz' is unexpected"),
    ("query-version", {"a": 1, "b": 2, "zzz": 3}, "Parameter 'b' is unexpected"),
    ("quit", {"foo": 1, "bar": 2}, "Parameter 'bar' is unexpected"),
    ("block-export-del", {"foo": 1, "bar": 2, "baz": 3, "id": "e"},
     "Parameter 'baz' is unexpected"),
    ("block-export-del", {**{c: 1 for c in "abcdefghij"}, "id": "e", "mode": "hard"},
     "Parameter 'b' is unexpected"),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "q": 1, "w": 2,
                                                            "e": 3}}},
     "Parameter 'addr.data.e' is unexpected"),
])
def test_several_unexpected_members_like_qemu(command: str, arguments: dict[str, Any],
                                              desc: str) -> None:
    assert error_of(command, arguments) == desc


def test_unsigned_accepts_negative_like_qemu() -> None:
    # qobject_input_type_uint64() takes negative numbers "for backward compatibility".
    assert qapi.parse_type("uint64", -1) == (1 << 64) - 1
    assert qapi.parse_type("size", -2) == (1 << 64) - 2
    assert qapi.parse_type("uint64", "-1", keyval=True) == (1 << 64) - 1


# -- keyval (command line) -----------------------------------------------------


@pytest.mark.parametrize(("type_name", "value", "desc"), [
    ("BlockExportOptions", {**NBD, "writable": "x"}, "Parameter 'writable' expects 'on' or 'off'"),
    ("BlockExportOptions", {**NBD, "writable": "Y"}, "Parameter 'writable' expects 'on' or 'off'"),
    ("BlockExportOptions", {**NBD, "writable": "1"}, "Parameter 'writable' expects 'on' or 'off'"),
    ("BlockExportOptions", {"type": "nbd", "id": "e"}, "Parameter 'node-name' is missing"),
    ("BlockExportOptions", {**NBD, "iothread": {"a": "1"}},
     "Invalid parameter type for 'iothread', expected: BlockExportIothreads"),
    ("BlockExportOptions", {**NBD, "bitmaps": ["a", {"node": "x"}]},
     "Parameter 'bitmaps.1.name' is missing"),
    ("BlockExportOptions", {**NBD, "name": {"x": "1"}}, "Parameters 'name.*' are unexpected"),
    ("BlockExportOptions", {**NBD, "foo": "x"}, "Parameter 'foo' is unexpected"),
    ("BlockExportOptions", {**NBD, "zz": "1", "aa": "2", "foo": "3", "bar": "4"},
     "Parameter 'aa' is unexpected"),
    ("NbdServerOptions", {"addr": {"type": "unix"}}, "Parameter 'addr.path' is missing"),
    ("NbdServerOptions", {"addr": {"type": "foo"}}, "Parameter 'type' does not accept value 'foo'"),
    ("NbdServerOptions", {"addr": {"type": "inet", "host": "x", "port": "1", "to": "99999"}},
     "Parameter 'to' expects uint16_t"),
    ("NbdServerOptions", {"addr": {"type": "unix", "path": "/x"}, "max-connections": "-1"},
     "Parameter 'max-connections' expects uint32_t"),
    ("NbdServerOptions", {"addr": {"type": "unix", "path": "/x"}, "max-connections": "x"},
     "Parameter 'max-connections' expects integer"),
    ("NbdServerOptions", {"addr": "x"}, "Invalid parameter type for 'addr', expected: object"),
    ("ObjectOptions", {"qom-type": "iothread", "id": "x", "poll-max-ns": "abc"},
     "Parameter 'poll-max-ns' expects integer"),
    ("ObjectOptions", {"qom-type": "iothread", "id": "x", "poll-grow": "0x"},
     "Parameter 'poll-grow' expects integer"),
    ("ObjectOptions", {"qom-type": "iothread", "id": "x", "poll-grow": "99999999999999999999"},
     "Parameter 'poll-grow' expects integer"),
    ("MonitorOptions", {"chardev": "c", "mode": "x"}, "Parameter 'mode' does not accept value 'x'"),
    ("MonitorOptions", {"chardev": "c", "pretty": "maybe"},
     "Parameter 'pretty' expects 'on' or 'off'"),
    ("size", "abc", "Parameter '<anonymous>' expects size"),
    ("number", "x", "Invalid parameter type for '<anonymous>', expected: number"),
])
def test_keyval_error_texts(type_name: str, value: object, desc: str) -> None:
    assert keyval_error(type_name, value) == desc


def test_keyval_conversions() -> None:
    opts = qapi.parse_type("BlockExportOptions",
                           {**FUSE, "writable": "on", "growable": "yes", "iothread": ["a", "b"],
                            "allow-other": "off"}, keyval=True)
    assert isinstance(opts, g.BlockExportOptionsFuse)
    assert (opts.writable, opts.growable, opts.iothread) == (True, True, ["a", "b"])
    assert opts.allow_other == "off"
    obj = qapi.parse_type("ObjectOptions", {"qom-type": "iothread", "id": "x",
                                            "poll-max-ns": "0x10", "poll-grow": "010",
                                            "poll-shrink": "-3"}, keyval=True)
    assert (obj.poll_max_ns, obj.poll_grow, obj.poll_shrink) == (16, 8, -3)
    server = qapi.parse_type("NbdServerOptions",
                             {"addr": {"type": "inet", "host": "::", "port": "10809"},
                              "max-connections": "4"}, keyval=True)
    assert isinstance(server.addr, g.InetSocketAddress) and server.max_connections == 4
    assert qapi.parse_type("bool", "false", keyval=True) is False
    assert qapi.parse_type("number", "1.5", keyval=True) == 1.5


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("1k", 1024), ("1K", 1024), ("2M", 2 << 20), ("1g", 1 << 30),
    ("1.5M", 3 << 19), ("1.k", 1024), ("0x1000", 4096), ("1B", 1), ("1E", 1 << 60),
    ("16E", None), ("abc", None), ("0x10k", None), ("-1", None), ("1e3", None), ("", None),
    ("1.5", None), ("1.0", 1), ("1.5B", None), ("1 k", None),
])
def test_parse_size(text: str, value: int | None) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "unsigned", "value"), [
    ("10", False, 10), ("-10", False, -10), ("0x1f", False, 31), ("017", False, 15),
    (" 5", False, 5), ("5 ", False, None), ("08", False, None), ("", False, None),
    ("9223372036854775808", False, None), ("-1", True, (1 << 64) - 1),
    ("18446744073709551615", True, (1 << 64) - 1), ("18446744073709551616", True, None),
])
def test_parse_c_integer(text: str, unsigned: bool, value: int | None) -> None:
    assert parse_c_integer(text, unsigned=unsigned) == value


# -- wire form and introspection ---------------------------------------------


def test_to_wire_round_trip() -> None:
    arguments = {"addr": {"type": "inet", "data": {"host": "h", "port": "1", "keep-alive": True}},
                 "max-connections": 3}
    args = qapi.parse_command_args("nbd-server-start", arguments)
    assert qapi.to_wire(args) == arguments
    opts = qapi.parse_type("BlockExportOptions", {**FUSE, "iothread": ["a"]})
    assert qapi.to_wire(opts) == {"type": "fuse", "id": "e0", "iothread": ["a"],
                                  "node-name": "n0", "mountpoint": "/m"}
    info = g.BlockExportInfo(id="e", type=g.BlockExportType.nbd, node_name="n",
                             shutting_down=False)
    assert qapi.to_wire(info) == {"id": "e", "type": "nbd", "node-name": "n",
                                  "shutting-down": False}


def test_introspection_shape() -> None:
    schema = qapi.schema_introspection()
    by_name = {entry["name"]: entry for entry in schema}
    assert len(by_name) == len(schema)
    for command in qapi.command_names():
        assert by_name[command]["meta-type"] == "command"
    add = by_name["block-export-add"]
    assert set(add) == {"name", "meta-type", "arg-type", "ret-type"}
    arg = by_name[str(add["arg-type"])]
    assert arg["meta-type"] == "object" and arg["tag"] == "type"
    members = {m["name"]: m for m in arg["members"]}  # type: ignore[attr-defined]
    assert members["id"] == {"name": "id", "type": "str"}
    assert members["writable"] == {"name": "writable", "type": "bool", "default": None}
    iothread = by_name[members["iothread"]["type"]]
    assert iothread["meta-type"] == "alternate"
    assert iothread["members"] == [{"type": "str"}, {"type": "[str]"}]
    assert by_name["nbd-server-add"]["features"] == ["deprecated"]
    assert by_name["BLOCK_EXPORT_DELETED"]["meta-type"] == "event"
    assert by_name["int"] == {"name": "int", "meta-type": "builtin", "json-type": "int"}
    assert "uint32" not in by_name and "BlockExportOptions" not in by_name
    empty = by_name[str(by_name["quit"]["arg-type"])]
    assert empty == {"name": empty["name"], "meta-type": "object", "members": []}
    for entry in schema:
        for key in ("arg-type", "ret-type", "element-type"):
            if key in entry:
                assert str(entry[key]).strip("[]") in by_name or entry[key] in by_name
    # Callers get their own copy.
    schema.clear()
    assert qapi.schema_introspection()


# -- robustness ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.sampled_from(["nbd", "fuse", "unix", "inet", "on", "iothread", "0x10", "1k"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "id", "node-name", "mountpoint", "iothread",
                                       "addr", "data", "path", "host", "port", "writable",
                                       "bitmaps", "qom-type", "x"]), children, max_size=6),
    max_leaves=20)

TYPE_NAMES = ["BlockExportOptions", "NbdServerOptions", "NbdServerOptionsLegacy",
              "ObjectOptions", "ChardevBackend", "MonitorOptions", "BlockExportIothreads",
              "SocketAddress", "SocketAddressLegacy", "[str]", "size", "uint8", "number",
              "BlockExportRemoveMode"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(TYPE_NAMES), json_values, st.booleans())
def test_random_values_validate_or_raise_qmp_error(type_name: str, value: object,
                                                   keyval: bool) -> None:
    try:
        qapi.parse_type(type_name, value, keyval=keyval)
    except QMPError as exc:
        assert exc.desc and exc.error_class == "GenericError"
