"""Helpers for Python iotests, after QEMU's ``tests/qemu-iotests/iotests.py``.

A test does::

    import iotests
    with iotests.QemuStorageDaemon("--blockdev", "null-co,node-name=n0") as qsd:
        qsd.qmp_log("query-version")          # logs command and reply, sorted keys
        qsd.event_wait("BLOCK_EXPORT_DELETED")

``log()`` prints dicts as QEMU's iotests do (``json.dumps`` with sorted keys; a QMP
command keeps ``execute`` before ``arguments``), so reference outputs look like QEMU's.
The daemon's own stdout/stderr go to the test's output, which ``check`` compares.

Run as ``python iotests.py qmp-relay SOCKET IN_FIFO REPLIES EVENTS`` it is the QMP
connection behind ``common.sh``: commands from the fifo go to the daemon, replies and
events are appended (one JSON line each) to two files the shell functions poll.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

test_dir = os.environ.get("TEST_DIR", "/tmp")
sock_dir = os.environ.get("SOCK_DIR", "/tmp")
qsd_prog = shlex.split(os.environ.get("QSD_PROG", f"{sys.executable} -m qsd"))
qemu_img_prog = os.environ.get("QEMU_IMG_PROG", "qemu-img")
qemu_io_prog = os.environ.get("QEMU_IO_PROG", "qemu-io")
qemu_nbd_prog = os.environ.get("QEMU_NBD_PROG", "qemu-nbd")

Filter = Callable[[Any], Any]


def log(msg: object, filters: Iterable[Filter] = (), indent: int | None = None) -> None:
    """Print a message the way QEMU's iotests log() does (dicts: sorted JSON)."""
    for flt in filters:
        msg = flt(msg)
    if isinstance(msg, dict | list):
        print(json.dumps(msg, sort_keys=True, indent=indent), flush=True)
    else:
        print(msg, flush=True)


def filter_qmp_event(event: dict[str, Any]) -> dict[str, Any]:
    """QEMU's filter_qmp_event(): timestamps become SECS/USECS."""
    event = dict(event)
    if "timestamp" in event:
        event["timestamp"] = {"seconds": "SECS", "microseconds": "USECS"}
    return event


def _qmp_command(cmd: str, args: dict[str, Any]) -> str:
    """``{"execute": ..., "arguments": ...}`` with execute first and arguments sorted."""
    text = '{"execute": ' + json.dumps(cmd)
    if args:
        text += ', "arguments": ' + json.dumps(args, sort_keys=True)
    return text + "}"


class QemuStorageDaemon:
    """A qsd process with a QMP monitor on a unix socket in SOCK_DIR."""

    _instances = 0

    def __init__(self, *args: str, qmp: bool = True, name: str | None = None) -> None:
        QemuStorageDaemon._instances += 1
        self.name = name or f"qsd-{os.getpid()}-{QemuStorageDaemon._instances}"
        self.sock_path = os.path.join(sock_dir, f"{self.name}-qmp.sock")
        argv = [*qsd_prog, *args]
        if qmp:
            argv += ["--chardev", f"socket,id=qmp-mon,path={self.sock_path},server=on,wait=off",
                     "--monitor", "qmp-mon"]
        sys.stdout.flush()
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(argv)
        self.monitor: QEMUMonitorProtocol | None = None
        if qmp:
            self._connect()

    def _connect(self, timeout: float = 30.0) -> None:
        """Wait for the socket (or an early exit) and negotiate capabilities."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.sock_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"qsd exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"qsd did not create {self.sock_path}")
            time.sleep(0.02)
        self.monitor = QEMUMonitorProtocol(self.sock_path)
        self.monitor.connect(negotiate=True)

    def qmp(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Run a command; the whole reply.  Keyword ``a_b`` is argument ``a-b``."""
        assert self.monitor is not None
        arguments = {key.replace("_", "-"): value for key, value in args.items()}
        request: dict[str, Any] = {"execute": cmd}
        if arguments:
            request["arguments"] = arguments
        return dict(self.monitor.cmd_obj(request))

    def qmp_log(self, cmd: str, filters: Iterable[Filter] = (), indent: int | None = None,
                **args: Any) -> dict[str, Any]:
        """Log the command, run it, log the reply (QEMU's VM.qmp_log())."""
        arguments = {key.replace("_", "-"): value for key, value in args.items()}
        log(_qmp_command(cmd, arguments))
        result = self.qmp(cmd, **args)
        log(result, filters, indent)
        return result

    def event_wait(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """The next event called ``name`` (others are dropped), with its timestamp."""
        assert self.monitor is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {name} event within {timeout}s")
            event = self.monitor.pull_event(wait=remaining)
            if event is not None and event.get("event") == name:
                return dict(event)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon, wait for it, and return its exit status."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self.proc = None
        return status

    def __enter__(self) -> QemuStorageDaemon:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def qmp_relay(sock_path: str, in_fifo: str, replies: str, events: str) -> int:
    """The shell helpers' QMP connection: fifo lines in, reply/event lines out.

    Negotiates capabilities first; exits when the fifo's writer closes it or the daemon
    hangs up.
    """
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(sock_path)
    pending = b""
    handshake = 0  # the greeting, then the qmp_capabilities reply
    while handshake < 2:
        chunk = conn.recv(65536)
        if not chunk:
            return 1
        pending += chunk
        while handshake < 2 and b"\n" in pending:
            _, pending = pending.split(b"\n", 1)
            handshake += 1
            if handshake == 1:
                conn.sendall(b'{"execute": "qmp_capabilities"}\n')
    fifo = os.open(in_fifo, os.O_RDONLY)
    with open(replies, "ab", buffering=0) as rep, open(events, "ab", buffering=0) as evt:
        while True:
            ready, _, _ = select.select([fifo, conn.fileno()], [], [])
            if fifo in ready:
                data = os.read(fifo, 65536)
                if not data:
                    return 0
                conn.sendall(data)
            if conn.fileno() in ready:
                chunk = conn.recv(65536)
                if not chunk:
                    return 0
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    is_event = isinstance(message, dict) and "event" in message
                    (evt if is_event else rep).write(line.rstrip(b"\r") + b"\n")

if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "qmp-relay":
        sys.exit(qmp_relay(*sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} qmp-relay SOCKET IN_FIFO REPLIES EVENTS")
