"""Monitors on every kind of chardev qsd supports, and events reaching all of them."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

from tests.conftest import QsdFactory
from tests.harness import QSD, RawMonitor, wait_for_listener


def test_inherited_listening_fd(tmp_path: Path) -> None:
    # As in QEMU, an fd address is a connected socket unless server=on says it listens.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "l.sock"
    listener.bind(str(path))
    listener.listen(1)
    proc = subprocess.Popen(QSD + ["--chardev", f"socket,id=m,fd={listener.fileno()},"
                                   "server=on,wait=off", "--monitor", "m"],
                            pass_fds=[listener.fileno()], stderr=subprocess.PIPE)
    listener.close()
    try:
        raw = RawMonitor(path)
        raw.negotiate()
        chardevs = json.loads(raw.command(b'{"execute":"query-chardev"}'))["return"]
        assert chardevs == [{"label": "m", "filename": f"unix:{path},server=on",
                             "frontend-open": True}]
        raw.close()
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == b""
        proc.stderr.close()


def test_inherited_connected_fd() -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(QSD + ["--chardev", f"socket,id=m,fd={theirs.fileno()}",
                                   "--monitor", "m"], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ours.settimeout(10)
        assert b'"QMP"' in ours.recv(4096)
        ours.sendall(b'{"execute":"qmp_capabilities"}\n')
        assert ours.recv(4096) == b'{"return": {}}\r\n'
    finally:
        ours.close()
        proc.terminate()
        assert proc.wait(20) == 0


def test_stdio_monitor() -> None:
    result = subprocess.run(
        QSD + ["--chardev", "stdio,id=m", "--monitor", "m"],
        input=b'{"execute":"qmp_capabilities"}\n{"execute":"query-block-exports"}\n'
              b'{"execute":"quit"}\n',
        capture_output=True, timeout=30)
    lines = result.stdout.split(b"\r\n")
    assert json.loads(lines[0])["QMP"]["capabilities"] == ["oob"]
    assert lines[1:3] == [b'{"return": {}}', b'{"return": []}']
    assert lines[3:] == [b'{"return": {}}', b""]
    assert result.returncode == 0


def test_log_file_with_timestamps(tmp_path: Path) -> None:
    """logtimestamp=on: every line of the log begins with the UTC time, as 11.1.3 writes
    it; a pretty monitor's reply is many lines in one write, and each gets its own."""
    log = tmp_path / "m.log"
    result = subprocess.run(
        QSD + ["--chardev", f"stdio,id=m,logfile={log},logtimestamp=on",
               "--monitor", "m,pretty=on"],
        input=b'{"execute":"qmp_capabilities"}\n{"execute":"query-block-exports"}\n'
              b'{"execute":"quit"}\n',
        capture_output=True, timeout=30)
    assert result.returncode == 0
    stamp = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z "
    logged = log.read_bytes()
    lines = logged.split(b"\r\n")
    assert lines.pop() == b""
    assert all(re.match(stamp, line) for line in lines), logged
    assert b"\r\n".join(re.sub(stamp, b"", line) for line in lines) + b"\r\n" == (
        result.stdout)
    assert len(lines) == result.stdout.count(b"\r\n") > 20


def test_tcp_monitor_and_events_to_every_monitor(start_qsd: QsdFactory, tmp_path: Path) -> None:
    second = tmp_path.parent / f"{tmp_path.name[:8]}-2.sock"
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    daemon = start_qsd(
        "--chardev", f"socket,id=m2,path={second},server=on,wait=off", "--monitor", "m2",
        "--chardev", f"socket,id=m3,host=127.0.0.1,port={port},server=on,wait=off",
        "--monitor", "m3,pretty=off",
        "--blockdev", "null-co,node-name=n0",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock")
    wait_for_listener(second, daemon.proc)
    first = daemon.connect_raw()
    other = RawMonitor(second)
    # A greeting means start-up is over, so every chardev listens by now.
    for monitor in (first, other):
        monitor.negotiate()
    tcp = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert b'"QMP"' in tcp.recv(4096)
        tcp.sendall(b'{"execute":"qmp_capabilities"}\n')
        assert tcp.recv(4096) == b'{"return": {}}\r\n'
        chardevs = {c["label"]: c for c in json.loads(
            first.command(b'{"execute":"query-chardev"}'))["return"]}
        assert chardevs["m3"]["filename"].startswith(f"tcp:127.0.0.1:{port},server=on <-> ")
        assert chardevs["m2"]["filename"] == f"unix:{second},server=on"
        first.command(b'{"execute":"block-export-add","arguments":'
                      b'{"type":"nbd","id":"e0","node-name":"n0"}}')
        # An idle export is gone before the return, so its event comes first (11.1.3).
        event_line = first.command(b'{"execute":"block-export-del","arguments":{"id":"e0"}}')
        assert first.recv_line() == b'{"return": {}}'
        for line in (event_line, other.recv_line(), tcp.recv(4096).rstrip()):
            event = json.loads(line)
            assert (event["event"], event["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "e0"})
    finally:
        first.close()
        other.close()
        tcp.close()


def test_chardev_add_and_remove(start_qsd: QsdFactory, tmp_path: Path) -> None:
    daemon = start_qsd()
    raw = daemon.connect_raw()
    raw.negotiate()
    extra = daemon.sock_dir / "extra.sock"
    add = json.dumps({"execute": "chardev-add", "arguments": {"id": "c1", "backend": {
        "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": str(extra)}},
                                   "server": True, "wait": False}}}}).encode()
    assert raw.command(add) == b'{"return": {}}'
    assert extra.exists()
    assert raw.command(add) == (b'{"error": {"class": "GenericError", '
                                b'"desc": "Chardev with id \'c1\' already exists"}}')
    chardevs = {c["label"]: c for c in json.loads(
        raw.command(b'{"execute":"query-chardev"}'))["return"]}
    assert chardevs["c1"] == {"label": "c1", "filename": f"disconnected:unix:{extra},server=on",
                              "frontend-open": False}
    assert raw.command(b'{"execute":"chardev-remove","arguments":{"id":"c1"}}') == (
        b'{"return": {}}')
    assert not extra.exists()
    raw.close()
