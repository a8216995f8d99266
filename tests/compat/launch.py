"""Starting the daemon under test: QEMU's as a subprocess, qsd through a zygote.

Both give a ``Daemon``: its PID, pipes for stdin/stdout/stderr, ``poll``/``wait`` for its
exit status and ``signal``.  qsd's imports take most of a second, and the suite starts
about a hundred daemons, so the zygote (``tests/compat/zygote.py``) imports qsd once and
forks a daemon for each request, which then runs ``qsd.__main__.main(argv)`` exactly as
``python -m qsd`` would.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Protocol


class Daemon(Protocol):
    pid: int
    stdin_fd: int
    stdout_fd: int
    stderr_fd: int

    def poll(self) -> int | None: ...

    def signal(self, signum: int) -> None: ...


class Launcher(Protocol):
    def start(self, argv: list[str], cwd: str, stdin: bool) -> Daemon: ...

    def close(self) -> None: ...


class SubprocessDaemon:
    def __init__(self, command: list[str], cwd: str, stdin: bool) -> None:
        child_in, self.stdin_fd = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), -1)
        self.stdout_fd, child_out = os.pipe()
        self.stderr_fd, child_err = os.pipe()
        try:
            self.proc = subprocess.Popen(command, cwd=cwd, stdin=child_in, stdout=child_out,
                                         stderr=child_err)
        finally:
            for fd in (child_in, child_out, child_err):
                os.close(fd)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)


class SubprocessLauncher:
    """Runs ``prefix + argv``; the prefix must exec the daemon so that the PID is its own."""

    def __init__(self, prefix: list[str]) -> None:
        self.prefix = prefix

    def start(self, argv: list[str], cwd: str, stdin: bool) -> Daemon:
        return SubprocessDaemon(self.prefix + argv, cwd, stdin)

    def close(self) -> None:
        pass


class ZygoteDaemon:
    def __init__(self, zygote: ZygoteLauncher, pid: int, fds: tuple[int, int, int]) -> None:
        self.zygote = zygote
        self.pid = pid
        self.stdin_fd, self.stdout_fd, self.stderr_fd = fds
        self.status: int | None = None

    def poll(self) -> int | None:
        if self.status is None:
            self.status = self.zygote.exit_status(self.pid)
        return self.status

    def signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


class ZygoteLauncher:
    """Owns one zygote process; its daemons are reported back by PID with their status."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.compat.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], cwd=root)
        theirs.close()
        self.exits: dict[int, int] = {}
        self._receive()  # the zygote says it is ready once qsd is imported

    def _receive(self, timeout: float | None = None) -> dict[str, int] | None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data = self.sock.recv(4096)
        if not data:
            raise RuntimeError("the qsd zygote ended unexpectedly")
        message: dict[str, int] = json.loads(data)
        if "exit" in message:
            self.exits[message["exit"]] = message["status"]
        return message

    def start(self, argv: list[str], cwd: str, stdin: bool) -> Daemon:
        child_in, our_in = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), -1)
        our_out, child_out = os.pipe()
        our_err, child_err = os.pipe()
        request = json.dumps({"argv": argv, "cwd": cwd}).encode()
        fds = array.array("i", [child_in, child_out, child_err])
        self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        for fd in (child_in, child_out, child_err):
            os.close(fd)
        while True:
            message = self._receive()
            if message is not None and "pid" in message:
                return ZygoteDaemon(self, message["pid"], (our_in, our_out, our_err))

    def exit_status(self, pid: int) -> int | None:
        while self._receive(0) is not None:
            pass
        return self.exits.get(pid)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def wait_exit(daemon: Daemon, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while (status := daemon.poll()) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)
    return status
