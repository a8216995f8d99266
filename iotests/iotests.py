"""Helpers for Python iotests, after QEMU's ``tests/qemu-iotests/iotests.py``.

A test does::

    import iotests
    with iotests.QemuStorageDaemon("--blockdev", "null-co,node-name=n0") as qsd:
        qsd.qmp_log("query-version")          # logs command and reply, sorted keys
        qsd.event_wait("BLOCK_EXPORT_DELETED")

``log()`` prints dicts as QEMU's iotests do (``json.dumps`` with sorted keys; a QMP
command keeps ``execute`` before ``arguments``), so reference outputs look like QEMU's.
The daemon's own stdout/stderr go to the test's output, which ``check`` compares.

Run as ``python iotests.py qmp-relay [--no-negotiate] SOCKET IN_FIFO REPLIES EVENTS ALL``
it is the QMP connection behind ``common.sh``: commands from the fifo go to the daemon,
replies and events are appended (one JSON line each) to two files the shell functions
poll, and every message also to ALL, in the order the daemon sent them.  It negotiates
capabilities itself unless told not to (then the test sends ``qmp_capabilities``).
"""

from __future__ import annotations

import json
import os
import re
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


def filter_testfiles(text: str) -> str:
    """QEMU's filter_testfiles(): per-process scratch names become ``PID-``."""
    pid = os.getpid()
    return (text.replace(os.path.join(test_dir, f"{pid}-"), "TEST_DIR/PID-")
            .replace(os.path.join(sock_dir, f"{pid}-"), "SOCK_DIR/PID-"))


def filter_qmp_testfiles(msg: Any) -> Any:
    """filter_testfiles() applied to every string in a QMP message."""
    if isinstance(msg, str):
        return filter_testfiles(msg)
    if isinstance(msg, dict):
        return {key: filter_qmp_testfiles(value) for key, value in msg.items()}
    if isinstance(msg, list):
        return [filter_qmp_testfiles(value) for value in msg]
    return msg


def filter_nbd_exports(text: str) -> str:
    """QEMU's filter_nbd_exports(): block size limits of ``qemu-nbd -L`` become XXX."""
    return re.sub(r"((min|opt|max) block): [0-9]+", r"\1: XXX", text)


def _qmp_command(cmd: str, args: dict[str, Any]) -> str:
    """QEMU's qmp_log() form: execute first, then arguments (always, sorted)."""
    return ('{"execute": ' + json.dumps(cmd) + ', "arguments": '
            + json.dumps(args, sort_keys=True) + "}")


def _run_tool(argv: list[str]) -> str:
    """Run a tool; its merged stdout and stderr."""
    sys.stdout.flush()
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False).stdout


def qemu_img(*args: str) -> str:
    """Run qemu-img; its output (not logged, like QEMU's qemu_img())."""
    return _run_tool([qemu_img_prog, *args])


def qemu_io_log(*args: str) -> str:
    """Run qemu-io and log its output."""
    output = _run_tool([qemu_io_prog, *args])
    log(output)
    return output


def qemu_nbd_list_log(*args: str, filters: Iterable[Filter] = ()) -> str:
    """``qemu-nbd -L ARGS``, logged with QEMU's filters (and any given)."""
    output = _run_tool([qemu_nbd_prog, "-L", *args])
    log(output, filters=[filter_testfiles, filter_nbd_exports, *filters])
    return output


class QemuIoInteractive:
    """A qemu-io process driven command by command (QEMU's QemuIoInteractive)."""

    PROMPT = "qemu-io> "

    def __init__(self, *args: str) -> None:
        sys.stdout.flush()
        self._proc = subprocess.Popen([qemu_io_prog, *args], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
        greeting = self._read_to_prompt()
        if greeting:
            raise RuntimeError(f"qemu-io did not start: {greeting!r}")

    def _read_to_prompt(self) -> str:
        """Output up to the next prompt (without it); everything left at EOF."""
        assert self._proc.stdout is not None
        out = ""
        while not out.endswith(self.PROMPT):
            char = self._proc.stdout.read(1)
            if not char:
                return out
            out += char
        return out[:-len(self.PROMPT)]

    def cmd(self, command: str) -> str:
        """Run one command; its output."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._read_to_prompt()

    def close(self) -> None:
        """Quit qemu-io and wait for it."""
        self._proc.communicate("q\n")


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
        """Wait for the socket to listen (or an early exit) and negotiate capabilities.

        The socket file exists a moment before it listens (bind, then listen), so a
        refused connection is retried too."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qsd exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"qsd does not listen on {self.sock_path}")
            if os.path.exists(self.sock_path):
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(self.sock_path)
                    break
                except ConnectionRefusedError:
                    pass
                finally:
                    probe.close()
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
        """Log the command, run it, log the reply (QEMU's VM.qmp_log()); the filters
        apply to the command's arguments and to the reply."""
        filters = list(filters)
        arguments: Any = {key.replace("_", "-"): value for key, value in args.items()}
        for flt in filters:
            arguments = flt(arguments)
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

    def get_qmp_events_filtered(self, wait: bool | float = False) -> list[dict[str, Any]]:
        """All pending events, timestamps filtered (QEMU's VM method); ``wait`` as in
        ``QEMUMonitorProtocol.get_events()``."""
        assert self.monitor is not None
        return [filter_qmp_event(event) for event in self.monitor.get_events(wait)]

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


def qmp_relay(sock_path: str, in_fifo: str, replies: str, events: str, every: str,
              negotiate: bool = True) -> int:
    """The shell helpers' QMP connection: fifo lines in, reply/event lines out.

    Negotiates capabilities first; exits when the fifo's writer closes it or the daemon
    hangs up.
    """
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(sock_path)
    pending = b""
    handshake = 0  # the greeting, then (when negotiating) the qmp_capabilities reply
    handshake_lines = 2 if negotiate else 1
    while handshake < handshake_lines:
        chunk = conn.recv(65536)
        if not chunk:
            return 1
        pending += chunk
        while handshake < handshake_lines and b"\n" in pending:
            _, pending = pending.split(b"\n", 1)
            handshake += 1
            if handshake == 1 and negotiate:
                conn.sendall(b'{"execute": "qmp_capabilities"}\n')
    fifo = os.open(in_fifo, os.O_RDONLY)
    with open(replies, "ab", buffering=0) as rep, open(events, "ab", buffering=0) as evt, \
            open(every, "ab", buffering=0) as allf:
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
                    line = line.rstrip(b"\r") + b"\n"
                    (evt if is_event else rep).write(line)
                    allf.write(line)


if __name__ == "__main__":
    relay_args = sys.argv[2:]
    no_negotiate = relay_args[:1] == ["--no-negotiate"]
    if no_negotiate:
        relay_args = relay_args[1:]
    if len(relay_args) == 5 and sys.argv[1] == "qmp-relay":
        sys.exit(qmp_relay(*relay_args, negotiate=not no_negotiate))
    sys.exit(f"usage: {sys.argv[0]} qmp-relay [--no-negotiate] SOCKET IN_FIFO REPLIES EVENTS ALL")
