"""Starting and stopping real qsd processes for whole-daemon tests.

Every daemon is started as a child process, watched by PID and ended by PID (SIGTERM, then
SIGKILL after a grace period); FUSE mounts it may have left are lazily unmounted so that a
failing test cannot leave a mount behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# A DeprecationWarning raised from qsd's own code (its modules, or __main__ when it runs
# as a program) is an error in every daemon the tests start, as it is in the test process
# (pyproject's filterwarnings); other packages' warnings keep their default treatment.
QSD_DEPRECATIONS_FATAL = ("import warnings; warnings.filterwarnings('error', "
                          r"category=DeprecationWarning, module=r'(qsd(\..*)?|__main__)$')")
QSD = [sys.executable, "-c", QSD_DEPRECATIONS_FATAL
       + "; import runpy; runpy.run_module('qsd', run_name='__main__', alter_sys=True)"]
# The same with tests/leak_probe.py loaded first (Qsd(probe=True)).
LEAK_PROBE = Path(__file__).with_name("leak_probe.py")
QSD_WITH_PROBE = [sys.executable, "-c", QSD_DEPRECATIONS_FATAL
                  + f"; import runpy; runpy.run_path({str(LEAK_PROBE)!r})"
                  + "; runpy.run_module('qsd', run_name='__main__', alter_sys=True)"]


def nbd_list(sock: Path | str) -> str:
    """``qemu-nbd -L`` of the NBD server listening on the unix socket ``sock``."""
    return subprocess.run(["qemu-nbd", "-L", "-k", str(sock)], capture_output=True,
                          text=True, check=True, timeout=20).stdout


def nbd_flags(listing: str, flags: int, names: str) -> str:
    """The flags line ``qemu-nbd -L`` prints for an export with ``flags``.

    A client that negotiates extended headers (QEMU 8.2 and later: "transaction size:
    64-bit") is also offered block-status payloads, so the line depends on the client.
    """
    if "transaction size: 64-bit" in listing:
        return f"flags: {flags | 0x1000:#x} ( {names} block-status-payload )"
    return f"flags: {flags:#x} ( {names} )"


def fuse_mounts() -> set[str]:
    with open("/proc/mounts") as mounts:
        return {line.split()[1] for line in mounts if line.split()[2].startswith("fuse")}


def fd_numbers(pid: int, target: str) -> set[int]:
    """The numbers of process ``pid``'s open fds that lead to ``target`` (a path such as
    /dev/fuse, or a kernel object's name such as anon_inode:[io_uring])."""
    fd_dir = f"/proc/{pid}/fd"
    found = set()
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{name}") == target:
                found.add(int(name))
        except OSError:
            pass    # closed while we looked
    return found


def is_listening(path: Path, pid: int | str = "self") -> bool:
    """Whether a unix socket at ``path`` accepts connections (flag __SO_ACCEPTCON), as
    seen from the network namespace of process ``pid`` (the table is per namespace)."""
    try:
        with open(f"/proc/{pid}/net/unix") as table:
            lines = table.readlines()
    except OSError:
        return False    # the process is gone
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
            return True
    return False


def wait_for_listener(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0
                      ) -> None:
    deadline = time.monotonic() + timeout
    while not is_listening(path, proc.pid):
        if proc.poll() is not None:
            raise RuntimeError(f"qsd exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} is not listening")
        time.sleep(0.01)


def wait_for_path(path: Path, proc: subprocess.Popen[bytes] | None = None,
                  timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"qsd exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


def wait_for_mount(path: Path, qsd: Qsd, timeout: float = 20.0) -> None:
    """Waits until the daemon's FUSE export is mounted on ``path``."""
    deadline = time.monotonic() + timeout
    while str(path) not in fuse_mounts():
        if qsd.proc.poll() is not None:
            raise RuntimeError(f"qsd exited with {qsd.proc.returncode}: {qsd.read_stderr()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not mounted")
        time.sleep(0.01)


class Qsd:
    """One qsd process with a QMP monitor on ``self.qmp_path``; with ``probe``, one
    whose asyncio tasks tests/leaks.py can count (through ``self.probe_path``)."""

    def __init__(self, workdir: Path, args: list[str], monitor: bool = True,
                 pretty: bool = False, netns: str | None = None, probe: bool = False
                 ) -> None:
        self.workdir = workdir
        # Unix socket paths are limited to 108 bytes; pytest's tmp paths can be longer.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="qsd-", dir="/tmp"))
        self.qmp_path = self.sock_dir / "qmp.sock"
        self.probe_path = self.sock_dir / "probe.sock"
        monitor_args = []
        if monitor:
            monitor_args = ["--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                            "--monitor", "qmp0" + (",pretty=on" if pretty else "")]
        self.mounts_before = fuse_mounts()
        self.stdout = b""
        self.stderr = b""
        # In a network namespace of the test's, but in the test's mount namespace (nsenter
        # execs the daemon: its PID stays the one to signal).
        enter = [] if netns is None else ["nsenter", f"--net=/run/netns/{netns}"]
        env = dict(os.environ, QSD_LEAK_PROBE=str(self.probe_path)) if probe else None
        self.proc = subprocess.Popen(enter + (QSD_WITH_PROBE if probe else QSD) + monitor_args
                                     + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=workdir, env=env)
        if monitor:
            try:
                wait_for_listener(self.qmp_path, self.proc)
            except BaseException:
                self.stop()      # nobody else knows this daemon yet: end it by its PID
                raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect_raw(self) -> RawMonitor:
        return RawMonitor(self.qmp_path)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def read_stderr(self) -> str:
        """What qsd wrote to stderr since the last call, without waiting for more; also
        keeps the pipe from filling up, which would block a daemon that reports a lot."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        chunks = []
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(fd, True)
        self.stderr += b"".join(chunks)
        return b"".join(chunks).decode(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for mount in fuse_mounts() - self.mounts_before:
            if mount.startswith((str(self.workdir), str(self.sock_dir))):
                subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.stdout = self.proc.stdout.read()
            self.proc.stdout.close()
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.stderr += self.proc.stderr.read()
            self.proc.stderr.close()
        assert b"DeprecationWarning" not in self.stderr, self.stderr.decode(errors="replace")
        return self.proc.returncode


class RawMonitor:
    """Byte-level QMP access, for what a library client would never send."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("monitor closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\n")
        return self.recv_line()

    def negotiate(self) -> bytes:
        greeting = self.recv_line()
        assert self.command(b'{"execute": "qmp_capabilities"}') == b'{"return": {}}'
        return greeting

    def close(self) -> None:
        self.sock.close()


class Monitor:
    """QMP over the harness's raw socket; events are kept aside."""

    def __init__(self, qsd: Qsd) -> None:
        self.raw: RawMonitor = qsd.connect_raw()
        self.raw.negotiate()
        self.events: list[dict[str, Any]] = []

    def cmd(self, name: str, /, **args: Any) -> dict[str, Any]:
        self.send(name, **args)
        return self.reply()

    def send(self, name: str, /, **args: Any) -> None:
        """Sends a command without waiting for its reply (see ``reply``)."""
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.raw.send(json.dumps(msg).encode() + b"\n")

    def reply(self) -> dict[str, Any]:
        """The next reply; the events before it are kept aside."""
        while True:
            reply: dict[str, Any] = json.loads(self.raw.recv_line())
            if "event" in reply:
                self.events.append(reply)
            else:
                return reply

    def ok(self, name: str, /, **args: Any) -> Any:
        reply = self.cmd(name, **args)
        assert "return" in reply, reply
        return reply["return"]

    def err(self, name: str, /, **args: Any) -> str:
        reply = self.cmd(name, **args)
        assert "error" in reply, reply
        desc: str = reply["error"]["desc"]
        return desc

    def wait_event(self, name: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name:
                    self.events.remove(event)
                    return event
            assert time.monotonic() < deadline, f"no {name}"
            self.events.append(json.loads(self.raw.recv_line()))


def replay(argv: list[str], workdir: str, steps: Iterable[tuple[str, dict[str, Any]]]
           ) -> list[str]:
    """Starts a daemon (``argv`` plus a monitor on a socket in ``workdir``), sends each
    step's command and returns the reply lines as the daemon wrote them (events left
    out): the same steps played against QEMU's daemon record a golden file."""
    path = Path(workdir) / "qmp.sock"
    proc = subprocess.Popen([*argv, "--chardev", f"socket,id=m,path={path},server=on,wait=off",
                             "--monitor", "chardev=m"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for_listener(path, proc, timeout=20)
        monitor = RawMonitor(path)
        try:
            monitor.negotiate()
            replies = []
            for command, args in steps:
                line = monitor.command(json.dumps({"execute": command, "arguments": args})
                                       .encode())
                while line.startswith(b'{"timestamp"'):
                    line = monitor.recv_line()
                replies.append(line.decode())
            return replies
        finally:
            monitor.close()
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()
