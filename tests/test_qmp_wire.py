"""The wire as QEMU 11.1.3's daemon shows it, where qsd used to differ (issue #10).

Expected bytes are 11.1.3's, read off the real daemon (tests/compat has the transcripts).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import QsdFactory
from tests.harness import RawMonitor


def _negotiated(start_qsd: QsdFactory, *args: str) -> RawMonitor:
    raw = start_qsd(*args).connect_raw()
    raw.negotiate()
    return raw


def test_ids_are_echoed_as_qemu_prints_them(start_qsd: QsdFactory) -> None:
    raw = _negotiated(start_qsd)
    version = raw.command(b'{"execute": "query-version"}')
    for sent, echoed in [
        (b"1", b"1"), (b"100", b"100"), (b"1.0", b"1"), (b"0.1", b"0.10000000000000001"),
        (b"-0", b"0"), (b"-0.0", b"-0"), (b"1e999", b"inf"), (b"-1e999", b"-inf"),
        (b"1e17", b"1e+17"), (b"18446744073709551616", b"1.8446744073709552e+19"),
        (b'"\xc3\xa9"', b'"\\u00E9"'), (b'"\\u007f\\ud83d\\ude00"', b'"\\u007F\\uD83D\\uDE00"'),
        (b"1" * 5000, b"inf"),
    ]:
        reply = raw.command(b'{"execute": "query-version", "id": ' + sent + b"}")
        assert reply == version[:-1] + b', "id": ' + echoed + b"}", sent[:20]


def test_a_deeply_nested_id_is_echoed(start_qsd: QsdFactory) -> None:
    raw = _negotiated(start_qsd)
    nested = b"[" * 1023 + b"]" * 1023
    reply = raw.command(b'{"execute": "query-version", "id": ' + nested + b"}")
    assert reply.endswith(b', "id": ' + nested + b"}")
    assert raw.command(b'{"execute": "query-version", "id": 2}').endswith(b'"id": 2}')


def test_parse_errors_name_line_and_column(start_qsd: QsdFactory) -> None:
    raw = _negotiated(start_qsd)
    assert raw.command(b'{"a": 1, "a": 2}') == (
        b'{"error": {"class": "GenericError", "desc": "2:15: JSON parse error, duplicate key"}}')
    assert raw.command(b"  nonsense") == (
        b'{"error": {"class": "GenericError", '
        b'"desc": "3:3: JSON parse error, invalid keyword \'nonsense\'"}}')


def test_an_unfinished_request_at_eof_is_not_run(start_qsd: QsdFactory) -> None:
    daemon = start_qsd("--blockdev", "null-co,node-name=n0")
    raw = daemon.connect_raw()
    raw.negotiate()
    raw.send(b'{"execute": "blockdev-del", "arguments": {"node-name": "n0"}')
    raw.sock.shutdown(1)
    assert raw.sock.recv(100) == b""
    raw.close()
    again = daemon.connect_raw()
    again.negotiate()
    assert again.command(b'{"execute": "blockdev-del", "arguments": {"node-name": "n0"}}') \
        == b'{"return": {}}'


def _events_then_return(raw: RawMonitor, command: bytes) -> tuple[list[str], bytes]:
    raw.send(command + b"\n")
    events = []
    while (line := raw.recv_line()).startswith(b'{"timestamp"'):
        message = json.loads(line)
        events.append(message["data"]["id"])
    return events, line


def test_idle_nbd_export_is_deleted_before_the_return(start_qsd: QsdFactory,
                                                     tmp_path: Path) -> None:
    raw = _negotiated(start_qsd, "--blockdev", "null-co,node-name=n0", "--nbd-server",
                      f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
                      "--export", "nbd,id=e0,node-name=n0")
    events, reply = _events_then_return(
        raw, b'{"execute": "block-export-del", "arguments": {"id": "e0"}}')
    assert (events, reply) == (["e0"], b'{"return": {}}')


def test_idle_fuse_export_is_deleted_before_the_return(start_qsd: QsdFactory,
                                                      tmp_path: Path) -> None:
    mountpoint = tmp_path / "disk"
    mountpoint.touch()
    raw = _negotiated(start_qsd, "--blockdev", "null-co,node-name=n0",
                      "--export", f"fuse,id=e0,node-name=n0,mountpoint={mountpoint}")
    events, reply = _events_then_return(
        raw, b'{"execute": "block-export-del", "arguments": {"id": "e0"}}')
    assert (events, reply) == (["e0"], b'{"return": {}}')


def test_nbd_server_stop_deletes_idle_exports_newest_first(start_qsd: QsdFactory,
                                                          tmp_path: Path) -> None:
    raw = _negotiated(start_qsd, "--blockdev", "null-co,node-name=n0", "--nbd-server",
                      f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
                      "--export", "nbd,id=a1,node-name=n0,name=a1",
                      "--export", "nbd,id=a2,node-name=n0,name=a2",
                      "--export", "nbd,id=a3,node-name=n0,name=a3")
    events, reply = _events_then_return(raw, b'{"execute": "nbd-server-stop"}')
    assert (events, reply) == (["a3", "a2", "a1"], b'{"return": {}}')
