"""qsd's command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import QSD, RawMonitor


def run_qsd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(QSD + list(args), capture_output=True, text=True, timeout=timeout)


def test_help_and_version() -> None:
    result = run_qsd("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: qsd [options]\nQEMU storage daemon\n")
    assert "--export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>" in result.stdout
    result = run_qsd("-V")
    assert result.returncode == 0
    assert result.stdout.startswith("qsd version 11.1.0")


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "qsd: unrecognized option '--bogus'"),
    (["--blockdev"], "qsd: option '--blockdev' requires an argument"),
    (["foo"], "qsd: foo: Unexpected argument"),
    (["-x"], "qsd: invalid option -- 'x'"),
    (["--help=1"], "qsd: option '--help' doesn't allow an argument"),
    (["--export", "fuse,id=x"], "qsd: --export fuse,id=x: Parameter 'node-name' is missing"),
    (["--monitor", "nochar"], 'qsd: --monitor nochar: chardev "nochar" not found'),
    (["--chardev", "socket,path=/tmp/a"],
     "qsd: --chardev socket,path=/tmp/a: chardev: no id specified"),
    (["--blockdev", '{"driver":"null-co","size":"x"}'],
     "qsd: --blockdev {\"driver\":\"null-co\",\"size\":\"x\"}: "
     "Invalid parameter type for 'size', expected: integer"),
    (["--blockdev", '{"driver":"null-co",'],
     "qsd: --blockdev {\"driver\":\"null-co\",: "
     "1:21: JSON parse error, premature end of input"),
    (["--object", "iothread,id=a", "--object", "iothread,id=a"],
     "qsd: --object iothread,id=a: attempt to add duplicate property 'a' to object "
     "(type 'container')"),
])
def test_errors_name_the_option(args: list[str], message: str) -> None:
    result = run_qsd(*args)
    assert result.returncode == 1
    assert result.stderr == message + "\n"
    assert result.stdout == ""


def test_keyval_and_json_forms_build_the_same_node(start_qsd: QsdFactory) -> None:
    daemon = start_qsd(
        "--blockdev", "null-co,node-name=kv,size=67108864,read-zeroes=on",
        "--blockdev", '{"driver": "null-co", "node-name": "js", "size": 67108864, '
                      '"read-zeroes": true}',
        "--object", "iothread,id=io0,poll-max-ns=0",
    )
    raw = daemon.connect_raw()
    raw.negotiate()
    nodes = json.loads(raw.command(b'{"execute":"query-named-block-nodes"}'))["return"]
    by_name = {n["node-name"]: n for n in nodes}
    assert by_name["kv"]["image"]["virtual-size"] == by_name["js"]["image"]["virtual-size"]
    assert by_name["kv"]["drv"] == by_name["js"]["drv"] == "null-co"
    raw.close()


def test_pidfile_written_and_removed(start_qsd: QsdFactory, tmp_path: Path) -> None:
    pidfile = tmp_path / "qsd.pid"
    daemon = start_qsd("--pidfile", str(pidfile))
    # The monitor greets once start-up is over, and with it the pidfile's writing.
    daemon.connect_raw().negotiate()
    assert int(pidfile.read_text()) == daemon.pid
    assert daemon.stop() == 0
    assert not pidfile.exists()


def test_daemonize(tmp_path: Path) -> None:
    pidfile = tmp_path / "qsd.pid"
    sock = tmp_path / "qmp.sock"
    result = run_qsd("--daemonize", "--pidfile", str(pidfile),
                     "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                     "--monitor", "m")
    assert result.returncode == 0, result.stderr
    # The parent returned only once the daemon was ready: socket and pidfile exist now.
    assert sock.exists()
    pid = int(pidfile.read_text())
    try:
        raw = RawMonitor(sock)
        raw.negotiate()
        assert raw.command(b'{"execute":"quit"}') == b'{"return": {}}'
        raw.close()
        deadline = time.monotonic() + 10
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pidfile.exists()
    finally:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass


def test_daemonize_reports_startup_errors(tmp_path: Path) -> None:
    result = run_qsd("--daemonize", "--monitor", "nochar")
    assert result.returncode == 1
    assert result.stderr == 'qsd: --monitor nochar: chardev "nochar" not found\n'


def test_monitor_socket_mode_is_0600(start_qsd: QsdFactory) -> None:
    daemon = start_qsd()
    assert daemon.qmp_path.stat().st_mode & 0o777 == 0o600


def test_sigterm_exits_cleanly_and_silently(start_qsd: QsdFactory) -> None:
    daemon = start_qsd("--blockdev", "null-co,node-name=n0")
    raw = daemon.connect_raw()
    raw.negotiate()
    raw.close()
    assert daemon.stop() == 0
    assert (daemon.stdout, daemon.stderr) == (b"", b"")
    assert not daemon.qmp_path.exists()
