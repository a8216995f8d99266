"""Chardevs as QEMU 11.1.3's daemon runs them: QMP's chardev-add, --chardev, query-chardev.

Every expected text below was printed by qemu-storage-daemon 11.1.3 for the same steps
(with its program name replaced by qsd's and its temporary directory by ours).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QsdFactory
from tests.harness import QSD, Qsd, RawMonitor, is_listening


class Monitor:
    def __init__(self, daemon: Qsd) -> None:
        self.raw = daemon.connect_raw()
        self.raw.negotiate()

    def cmd(self, name: str, /, **args: Any) -> dict[str, Any]:
        line = json.dumps({"execute": name, "arguments": args}).encode()
        reply: dict[str, Any] = json.loads(self.raw.command(line))
        return reply

    def add(self, chardev_id: str, backend: dict[str, Any]) -> dict[str, Any]:
        return self.cmd("chardev-add", id=chardev_id, backend=backend)

    def chardevs(self) -> list[dict[str, Any]]:
        chardevs: list[dict[str, Any]] = self.cmd("query-chardev")["return"]
        return chardevs

    def filename(self, chardev_id: str) -> str:
        return next(c["filename"] for c in self.chardevs() if c["label"] == chardev_id)


def unix(path: Path | str) -> dict[str, Any]:
    return {"type": "unix", "data": {"path": str(path)}}


def socket_backend(addr: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"type": "socket", "data": {"addr": addr, **options}}


def error(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


@pytest.fixture
def daemon(start_qsd: QsdFactory) -> Qsd:
    return start_qsd()


@pytest.fixture
def monitor(daemon: Qsd) -> Iterator[Monitor]:
    mon = Monitor(daemon)
    yield mon
    mon.raw.close()


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def stderr_of(daemon: Qsd) -> str:
    daemon.stop()
    return daemon.stderr.decode().replace(str(daemon.sock_dir), "@D")


def test_server_added_over_qmp_listens_without_waiting(daemon: Qsd, monitor: Monitor) -> None:
    path = daemon.sock_dir / "s.sock"
    assert monitor.add("s1", socket_backend(unix(path))) == {"return": {}}
    assert monitor.filename("s1") == f"disconnected:unix:{path},server=on"
    # Without a frontend the connection is held, shown, and noticed when it hangs up.
    first = socket.socket(socket.AF_UNIX)
    first.connect(str(path))
    eventually(lambda: monitor.filename("s1") == f"unix:{path},server=on")
    first.close()
    eventually(lambda: monitor.filename("s1") == f"disconnected:unix:{path},server=on")
    second = socket.socket(socket.AF_UNIX)
    second.connect(str(path))
    eventually(lambda: monitor.filename("s1") == f"unix:{path},server=on")
    second.close()


def test_server_with_wait_answers_once_a_client_connects(daemon: Qsd, monitor: Monitor
                                                         ) -> None:
    path = daemon.sock_dir / "w.sock"
    replies: list[bytes] = []
    command = json.dumps({"execute": "chardev-add", "arguments": {
        "id": "w1", "backend": socket_backend(unix(path), wait=True)}}).encode()
    waiter = threading.Thread(target=lambda: replies.append(monitor.raw.command(command)))
    waiter.start()
    eventually(lambda: is_listening(path))
    time.sleep(0.2)
    assert replies == []
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    waiter.join(20)
    assert replies == [b'{"return": {}}']
    assert monitor.filename("w1") == f"unix:{path},server=on"
    client.close()
    assert stderr_of(daemon) == (
        "qsd: info: QEMU waiting for connection on: disconnected:unix:@D/w.sock,server=on\n")


def test_query_chardev_order_and_connections(daemon: Qsd, monitor: Monitor,
                                             tmp_path: Path) -> None:
    path = daemon.sock_dir / "s1.sock"
    assert monitor.add("s1", socket_backend(unix(path))) == {"return": {}}
    assert monitor.add("c1", socket_backend(unix(path), server=False)) == {"return": {}}
    assert monitor.add("f1", {"type": "file", "data": {"out": str(tmp_path / "f1.out")}}) \
        == {"return": {}}
    assert monitor.add("n1", {"type": "null", "data": {}}) == {"return": {}}
    assert monitor.cmd("chardev-remove", id="n1") == {"return": {}}
    tcp = {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}
    assert monitor.add("t1", socket_backend(tcp)) == {"return": {}}
    eventually(lambda: monitor.filename("s1") == f"unix:{path},server=on")
    chardevs = monitor.chardevs()
    port = chardevs[0]["filename"].split(":")[3].split(",")[0]
    assert chardevs == [
        {"frontend-open": False, "filename": f"disconnected:tcp:127.0.0.1:{port},server=on",
         "label": "t1"},
        {"frontend-open": False, "filename": "file", "label": "f1"},
        {"frontend-open": True, "filename": f"unix:{daemon.qmp_path},server=on",
         "label": "qmp0"},
        {"frontend-open": False, "filename": f"unix:{path}", "label": "c1"},
        {"frontend-open": False, "filename": f"unix:{path},server=on", "label": "s1"},
    ]
    client = socket.create_connection(("127.0.0.1", int(port)))
    local = client.getsockname()[1]
    eventually(lambda: monitor.filename("t1") == (
        f"tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:{local}"))
    client.close()


def test_client_errors_and_option_checks(daemon: Qsd, monitor: Monitor) -> None:
    missing = daemon.sock_dir / "missing.sock"
    assert monitor.add("c", socket_backend(unix(missing), server=False)) == error(
        f"Failed to add chardev 'c': Failed to connect to '{missing}': "
        "No such file or directory")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    tcp = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
    assert monitor.add("c", socket_backend(tcp, server=False)) == error(
        f"Failed to add chardev 'c': Failed to connect to '127.0.0.1:{port}': "
        "Connection refused")
    assert monitor.add("c", socket_backend(unix(missing), **{"reconnect-ms": 5})) == error(
        "Failed to add chardev 'c': 'reconnect-ms' option is incompatible with socket in "
        "server listen mode")
    assert monitor.add("c", socket_backend(unix(missing), server=False, wait=False)) == error(
        "Failed to add chardev 'c': 'wait' option is incompatible with socket in client "
        "connect mode")
    assert monitor.add("c", socket_backend(unix(missing), **{"tls-authz": "x"})) == error(
        "Failed to add chardev 'c': 'tls_authz' option requires 'tls_creds' option")
    assert monitor.add("c", socket_backend(unix(missing), **{"tls-creds": "x"})) == error(
        "Failed to add chardev 'c': No TLS credentials with id 'x'")
    assert monitor.add("c", socket_backend({"type": "fd", "data": {"str": "3"}})) == error(
        "Failed to add chardev 'c': only QEMU supports file descriptor passing")
    assert monitor.add("c", socket_backend(
        {"type": "vsock", "data": {"cid": "x", "port": "1"}}, server=False)) == error(
        "Failed to add chardev 'c': Failed to parse cid 'x'")
    assert monitor.add("c", socket_backend(unix(missing), server=False, reconnect=1)) == error(
        "Parameter 'backend.data.reconnect' is unexpected")
    assert monitor.add("c", socket_backend(
        unix(missing), logfile=str(daemon.sock_dir / "nodir" / "log"))) == error(
        f"Failed to add chardev 'c': Could not create '{daemon.sock_dir}/nodir/log': "
        "No such file or directory")
    assert monitor.chardevs() == [
        {"frontend-open": True, "filename": f"unix:{daemon.qmp_path},server=on",
         "label": "qmp0"}]


def test_client_reconnects_and_reports_each_failing_series_once(daemon: Qsd,
                                                                 monitor: Monitor) -> None:
    path = daemon.sock_dir / "srv.sock"
    assert monitor.add("c2", socket_backend(unix(path), server=False,
                                            **{"reconnect-ms": 200})) == {"return": {}}
    assert monitor.filename("c2") == f"disconnected:unix:{path}"
    time.sleep(0.7)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(20)
    conn, _ = server.accept()
    eventually(lambda: monitor.filename("c2") == f"unix:{path}")
    conn.close()
    conn, _ = server.accept()  # it noticed the hang-up and came back
    eventually(lambda: monitor.filename("c2") == f"unix:{path}")
    server.close()
    path.unlink()
    conn.close()
    eventually(lambda: monitor.filename("c2") == f"disconnected:unix:{path}")
    time.sleep(0.7)
    failure = ("qsd: Unable to connect character device c2: Failed to connect to "
               "'@D/srv.sock': No such file or directory\n")
    assert stderr_of(daemon) == failure * 2


def test_file_backend(daemon: Qsd, monitor: Monitor, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert monitor.add("f1", {"type": "file", "data": {"out": str(out)}}) == {"return": {}}
    assert out.exists()
    assert monitor.filename("f1") == "file"
    assert monitor.add("f2", {"type": "file", "data": {"out": str(tmp_path / "no" / "o")}}) \
        == error(f"Failed to add chardev 'f2': Could not open '{tmp_path}/no/o': "
                 "No such file or directory")
    assert monitor.add("f3", {"type": "file", "data": {
        "out": str(tmp_path / "o3"), "in": str(tmp_path / "in")}}) == error(
        f"Failed to add chardev 'f3': Could not open '{tmp_path}/in': "
        "No such file or directory")


def test_monitor_on_a_file_chardev(tmp_path: Path) -> None:
    commands = tmp_path / "in"
    commands.write_text('{"execute":"qmp_capabilities"}\n{"execute":"query-chardev"}\n')
    out = tmp_path / "out"
    proc = subprocess.Popen(QSD + ["--chardev", f"file,id=f,path={out},input-path={commands}",
                                   "--monitor", "f"], stderr=subprocess.PIPE)
    try:
        eventually(lambda: out.exists() and out.read_bytes().count(b"\r\n") == 3)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == b""
        proc.stderr.close()
    lines = out.read_bytes().split(b"\r\n")
    assert json.loads(lines[0])["QMP"]["capabilities"] == ["oob"]
    assert lines[1:] == [
        b'{"return": {}}',
        b'{"return": [{"frontend-open": true, "filename": "file", "label": "f"}]}', b""]


def run_qsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(QSD + list(args), capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize(("option", "stderr"), [
    ("null,id=1x", "qsd: --chardev null,id=1x: Parameter 'id' expects an identifier\n"
                   "Identifiers consist of letters, digits, '-', '.', '_', starting with a "
                   "letter.\n"),
    ("id=x", 'qsd: --chardev id=x: chardev: "x" missing backend\n'),
    ("tcp,id=x,host=h,port=1", "qsd: --chardev tcp,id=x,host=h,port=1: 'tcp' is not a valid "
                               "char driver name\n"),
    ("socket,id=c,path=/x,host=y", "qsd: --chardev socket,id=c,path=/x,host=y: None or one "
                                   "of 'path', 'fd' or 'host' option required.\n"),
    ("socket,id=c,port=5", "qsd: --chardev socket,id=c,port=5: Unable to parse FD number \n"),
    ("socket,id=c,fd=abc", "qsd: --chardev socket,id=c,fd=abc: Unable to parse FD number abc\n"),
    ("socket,id=c,path=/x,reconnect=1",
     "qsd: --chardev socket,id=c,path=/x,reconnect=1: Invalid parameter 'reconnect'\n"),
    ("socket,id=c,path=/x,reconnect-ms=abc",
     "qsd: --chardev socket,id=c,path=/x,reconnect-ms=abc: Parameter 'reconnect-ms' expects "
     "a number\n"),
    ("socket,id=c,path=/x,server=on,wait=off,delay=off,nodelay=on",
     "qsd: --chardev socket,id=c,path=/x,server=on,wait=off,delay=off,nodelay=on: 'delay' "
     "and 'nodelay' are mutually exclusive\n"),
    ("socket,id=c,path=/x,server=on,reconnect-ms=0x10",
     "qsd: --chardev socket,id=c,path=/x,server=on,reconnect-ms=0x10: 'reconnect-ms' option "
     "is incompatible with socket in server listen mode\n"),
    ("socket,id=c,path=/x,wait=off", "qsd: --chardev socket,id=c,path=/x,wait=off: 'wait' "
                                     "option is incompatible with socket in client connect "
                                     "mode\n"),
    ("socket,id=c,fd=3,reconnect-ms=5", "qsd: --chardev socket,id=c,fd=3,reconnect-ms=5: "
                                        "'reconnect-ms' option is incompatible with 'fd' "
                                        "address type\n"),
    ("socket,id=c,path=/nonexistent/x", "qsd: --chardev socket,id=c,path=/nonexistent/x: "
                                        "Failed to connect to '/nonexistent/x': No such file "
                                        "or directory\n"),
    ("file,id=f", "qsd: --chardev file,id=f: chardev: file: no filename given\n"),
    ("null,id=n,logfile=/nonexistent/l", "qsd: --chardev null,id=n,logfile=/nonexistent/l: "
                                         "Could not create '/nonexistent/l': No such file or "
                                         "directory\n"),
])
def test_command_line_errors(option: str, stderr: str) -> None:
    result = run_qsd("--chardev", option)
    assert (result.returncode, result.stderr, result.stdout) == (1, stderr, "")


@pytest.mark.parametrize(("args", "stderr"), [
    (["--chardev", "null,id=a", "--chardev", "null,id=a"],
     "qsd: --chardev null,id=a: attempt to add duplicate property 'a' to object "
     "(type 'container')\n"),
    (["--chardev", "stdio,id=a", "--chardev", "stdio,id=b"],
     "qsd: --chardev stdio,id=b: cannot use stdio by multiple character devices\n"),
    (["--object", "iothread,id=1x"],
     "qsd: --object iothread,id=1x: Parameter 'id' expects an identifier\n"
     "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n"),
])
def test_command_line_conflicts(args: list[str], stderr: str) -> None:
    result = run_qsd(*args)
    assert (result.returncode, result.stderr) == (1, stderr)


def test_command_line_short_forms_warn(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    option = f"socket,id=m,path={path},server,nowait"
    proc = subprocess.Popen(QSD + ["--chardev", option, "--monitor", "m"],
                            stderr=subprocess.PIPE)
    try:
        eventually(lambda: is_listening(path))
        raw = RawMonitor(path)
        raw.negotiate()
        raw.close()
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.stderr is not None
    assert proc.stderr.read().decode() == (
        f"qsd: --chardev {option}: warning: short-form boolean option 'server' deprecated\n"
        "Please use server=on instead\n"
        f"qsd: --chardev {option}: warning: short-form boolean option 'nowait' deprecated\n"
        "Please use wait=off instead\n")
    proc.stderr.close()


def test_command_line_help_lists_the_backends() -> None:
    result = run_qsd("--chardev", "help")
    assert (result.returncode, result.stdout) == (
        0, "Available chardev backend types: \n  file\n  stdio\n  socket\n  null\n")
