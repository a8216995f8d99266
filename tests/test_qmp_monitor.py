"""The QMP monitor as clients see it on the wire; expected texts are QEMU's."""

from __future__ import annotations

import json

import pytest

from tests.conftest import QsdFactory


@pytest.fixture
def monitor(start_qsd: QsdFactory):  # type: ignore[no-untyped-def]
    daemon = start_qsd()
    raw = daemon.connect_raw()
    yield raw
    raw.close()


def test_greeting_and_negotiation(monitor) -> None:  # type: ignore[no-untyped-def]
    greeting = json.loads(monitor.recv_line())
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert greeting["QMP"]["version"]["qemu"] == {"major": 11, "minor": 1, "micro": 0}
    assert monitor.command(b'{"execute":"query-version"}') == (
        b'{"error": {"class": "CommandNotFound", "desc": '
        b"\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}")
    assert monitor.command(b'{"execute":"qmp_capabilities","id":1}') == b'{"return": {}, "id": 1}'
    assert monitor.command(b'{"execute":"qmp_capabilities"}') == (
        b'{"error": {"class": "CommandNotFound", "desc": '
        b'"Capabilities negotiation is already complete, command ignored"}}')


EXPECTED = [
    (b'{"execute":"nope","id":"x"}',
     b'{"id": "x", "error": {"class": "CommandNotFound", '
     b'"desc": "The command nope has not been found"}}'),
    (b'[1]', b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}'),
    (b'{"foo":1}',
     b'{"error": {"class": "GenericError", "desc": "QMP input member \'foo\' is unexpected"}}'),
    (b'{"execute":1}',
     b'{"error": {"class": "GenericError", '
     b'"desc": "QMP input member \'execute\' must be a string"}}'),
    (b'{"execute":"query-version","arguments":[]}',
     b'{"error": {"class": "GenericError", '
     b'"desc": "QMP input member \'arguments\' must be an object"}}'),
    (b'{"execute":"query-version","arguments":{"a":1}}',
     b'{"error": {"class": "GenericError", "desc": "Parameter \'a\' is unexpected"}}'),
    (b'{"exec-oob":"query-version"}',
     b'{"error": {"class": "GenericError", '
     b'"desc": "QMP input member \'exec-oob\' is unexpected"}}'),
    (b'{"id":1}',
     b'{"id": 1, "error": {"class": "GenericError", '
     b'"desc": "QMP input lacks member \'execute\'"}}'),
    (b'{"execute":"block-export-del","arguments":{"id":1}}',
     b'{"error": {"class": "GenericError", '
     b'"desc": "Invalid parameter type for \'id\', expected: string"}}'),
    (b'{"execute":"block-export-del","arguments":{}}',
     b'{"error": {"class": "GenericError", "desc": "Parameter \'id\' is missing"}}'),
    (b'{"execute":"block-export-del","arguments":{"id":"x","mode":"z"}}',
     b'{"error": {"class": "GenericError", '
     b'"desc": "Parameter \'mode\' does not accept value \'z\'"}}'),
    (b'{"execute":"block-export-del","arguments":{"id":"x"}}',
     b'{"error": {"class": "GenericError", "desc": "Export \'x\' is not found"}}'),
    (b'{"execute":"object-add","arguments":{"qom-type":"iothread","id":"a","poll-max-ns":"x"}}',
     b'{"error": {"class": "GenericError", '
     b'"desc": "Invalid parameter type for \'poll-max-ns\', expected: integer"}}'),
    (b'{"execute":"object-del","arguments":{"id":"zz"}}',
     b'{"error": {"class": "GenericError", "desc": "object \'zz\' not found"}}'),
    (b'{"execute":"chardev-remove","arguments":{"id":"zz"}}',
     b'{"error": {"class": "GenericError", "desc": "Chardev \'zz\' not found"}}'),
    (b'{"execute":"chardev-remove","arguments":{"id":"qmp0"}}',
     b'{"error": {"class": "GenericError", "desc": "Chardev \'qmp0\' is busy"}}'),
    (b"{'execute':'query-block-exports', 'id': 'single'}", b'{"return": [], "id": "single"}'),
    (b'{"execute":\n  "query-block-exports",\n "id": {"a": [1]}\n}',
     b'{"return": [], "id": {"a": [1]}}'),
]


@pytest.mark.parametrize(("request_line", "expected"), EXPECTED)
def test_request_errors_match_qemu(monitor, request_line: bytes,  # type: ignore[no-untyped-def]
                                   expected: bytes) -> None:
    monitor.negotiate()
    assert monitor.command(request_line) == expected
    # The monitor keeps serving after every error.
    assert monitor.command(b'{"execute":"query-block-exports"}') == b'{"return": []}'


def test_oob(monitor) -> None:  # type: ignore[no-untyped-def]
    monitor.recv_line()
    assert monitor.command(
        b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}') == b'{"return": {}}'
    assert monitor.command(b'{"exec-oob":"query-version","id":2}') == (
        b'{"id": 2, "error": {"class": "GenericError", '
        b'"desc": "The command query-version does not support OOB"}}')
    assert monitor.command(b'{"execute":"a","exec-oob":"b"}') == (
        b'{"error": {"class": "GenericError", '
        b'"desc": "QMP input member \'execute\' clashes with \'exec-oob\'"}}')


def test_iothread_objects(monitor) -> None:  # type: ignore[no-untyped-def]
    monitor.negotiate()
    add = b'{"execute":"object-add","arguments":{"qom-type":"iothread","id":"a"}}'
    assert monitor.command(add) == b'{"return": {}}'
    assert monitor.command(add) == (
        b'{"error": {"class": "GenericError", '
        b'"desc": "attempt to add duplicate property \'a\' to object (type \'container\')"}}')
    assert monitor.command(b'{"execute":"object-del","arguments":{"id":"a"}}') == (
        b'{"return": {}}')


def test_pretty_monitor(start_qsd: QsdFactory) -> None:
    daemon = start_qsd(pretty=True)
    raw = daemon.connect_raw()
    raw.recv_line()
    raw.send(b'{"execute":"qmp_capabilities"}\n')
    reply = b""
    while not reply.endswith(b"}\r\n"):
        reply += raw.sock.recv(4096)
    assert reply == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
    raw.close()


def test_query_commands_lists_what_is_implemented(monitor) -> None:  # type: ignore[no-untyped-def]
    monitor.negotiate()
    names = [c["name"] for c in json.loads(monitor.command(b'{"execute":"query-commands"}'))[
        "return"]]
    for name in ("qmp_capabilities", "query-version", "quit", "block-export-add",
                 "blockdev-add", "nbd-server-start", "object-add", "chardev-add"):
        assert name in names
    assert names.index("query-version") < names.index("qmp_capabilities")


def test_query_qmp_schema(monitor) -> None:  # type: ignore[no-untyped-def]
    monitor.negotiate()
    schema = json.loads(monitor.command(b'{"execute":"query-qmp-schema"}'))["return"]
    commands = {e["name"]: e for e in schema if e["meta-type"] == "command"}
    assert "block-export-add" in commands
    events = {e["name"] for e in schema if e["meta-type"] == "event"}
    assert "BLOCK_EXPORT_DELETED" in events


def test_quit_replies_then_exits(start_qsd: QsdFactory) -> None:
    """Unlike qemu-system, the storage daemon sends no SHUTDOWN event (11.1.3)."""
    daemon = start_qsd()
    raw = daemon.connect_raw()
    raw.negotiate()
    assert raw.command(b'{"execute":"quit"}') == b'{"return": {}}'
    assert raw.sock.recv(100) == b""
    assert daemon.wait() == 0
    assert not daemon.qmp_path.exists()


def test_nothing_is_answered_after_quit(start_qsd: QsdFactory) -> None:
    """Requests that arrive with quit, in the same write, are not run (11.1.3)."""
    daemon = start_qsd("--blockdev", "null-co,node-name=n0")
    raw = daemon.connect_raw()
    raw.negotiate()
    raw.send(b'{"execute":"quit","id":1}{"execute":"query-version","id":2}'
             b'{"execute":"blockdev-del","arguments":{"node-name":"n0"},"id":3}\n')
    assert raw.recv_line() == b'{"return": {}, "id": 1}'
    assert raw.sock.recv(100) == b""
    assert daemon.wait() == 0
