"""Plays a scenario against a daemon and returns its normalised transcript.

Two ways to decide that a step is over:

- *recording* (QEMU's daemon): wait until no channel has said anything for ``quiet``
  seconds.  Slow, but it needs no prior knowledge.
- *checking* (qsd): read as many lines per channel as the expected transcript holds for
  this step, then give stragglers a moment (``grace``) so that an extra line shows up in
  the step that caused it.  Fast: no step waits for silence.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable

from tests.compat.launch import Daemon, Launcher, wait_exit
from tests.compat.scenario import Op, Scenario, ScenarioError
from tests.compat.transcript import EOF_MARK, Step, Substitutions, normalise

Expectation = Callable[[str], "list[str] | None"]
KILLED = "<did not exit: killed>"

STEP_TIMEOUT = 15.0
SETTLE_TIMEOUT = 3.0
EXIT_TIMEOUT = 20.0


class Channel:
    """A byte stream from the daemon, split into lines as they complete."""

    def __init__(self, name: str, fd: int, sock: socket.socket | None = None,
                 crlf: bool = False, write_fd: int = -1) -> None:
        self.name = name
        self.fd = fd
        self.sock = sock
        self.crlf = crlf
        self.write_fd = write_fd
        self.buffer = b""
        self.lines: list[str] = []
        self.eof = False
        os.set_blocking(fd, False)

    def pump(self) -> bool:
        """Reads what is available; True if anything (data or EOF) arrived."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 20) if self.sock is not None else os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            data = b""  # an RST after unread input is just the end, see COMPATIBILITY.md
        if not data:
            self.eof = True
            if self.buffer:
                self.lines.append(self._text(self.buffer) + " [no newline]")
                self.buffer = b""
            self.lines.append(EOF_MARK)
            return True
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        self.lines.extend(self._text(line) for line in complete)
        return True

    def _text(self, line: bytes) -> str:
        """A line without its CR; a monitor line that lacks one says so."""
        if line.endswith(b"\r"):
            line = line[:-1]
        elif self.crlf:
            line += b" [no CR]"
        return line.decode("utf-8", "backslashreplace")

    def writable_fd(self) -> int:
        return self.fd if self.sock is not None else self.write_fd

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)
            if self.write_fd >= 0:
                os.close(self.write_fd)
        self.eof = True


class Runner:
    def __init__(self, launcher: Launcher, expectation: Expectation | None = None,
                 quiet: float = 0.3, grace: float = 0.002, settle: bool = False) -> None:
        self.launcher = launcher
        self.expectation = expectation
        self.quiet = quiet
        self.grace = grace
        # settle: wait for the expected lines (a few seconds at most), then for silence;
        # for listing what qsd says where that is not what 11.1.3 says.
        self.settle = settle
        self.channels: dict[str, Channel] = {}
        self.daemon: Daemon | None = None
        self.subs = Substitutions()
        self.tmp = ""
        self._sent = 0  # bytes sent in the current step

    # -- running a scenario ----------------------------------------------------

    def run(self, scenario: Scenario) -> list[Step]:
        self.tmp = tempfile.mkdtemp(prefix="qsd-compat-", dir="/tmp")
        self.subs = Substitutions({"$TMP": self.tmp})
        for number in range(1, 10):
            self.subs.values[f"$PORT{number}"] = str(_free_port())
        steps: list[Step] = []
        try:
            for op in scenario.ops:
                step = Step(op.key)
                self._execute(op, step)
                if op.is_step:
                    self._collect(step)
                    steps.append(step)
            end = Step("(end)")
            self._finish(end)
            if end.lines:
                steps.append(end)
        finally:
            self._cleanup()
        return steps

    def _execute(self, op: Op, step: Step) -> None:
        handler = getattr(self, "_op_" + op.name.replace("-", "_"))
        handler(op, step)

    def _collect(self, step: Step) -> None:
        expected = self._expected(step.key)
        if expected is None:
            self._wait_quiet()
        else:
            # Lines the operation itself wrote (an NBD handshake, a failed send) are not
            # to be read from the channel.
            counts = Step(step.key, expected).counts()
            written = step.counts()
            self._wait_for({name: count - written.get(name, 0)
                            for name, count in counts.items()},
                           SETTLE_TIMEOUT if self.settle else STEP_TIMEOUT)
            if self.settle:
                self._wait_quiet()
        for name in sorted(self.channels):
            channel = self.channels[name]
            for line in channel.lines:
                step.add(name, normalise(channel.name, line, self.subs))
            channel.lines = []

    def _open_channels(self) -> list[Channel]:
        return [channel for channel in self.channels.values() if not channel.eof]

    def _pump(self, timeout: float) -> bool:
        """Waits up to ``timeout`` for input on any channel; True if some arrived."""
        open_channels = self._open_channels()
        if not open_channels:
            return False
        ready, _, _ = select.select([c.fd for c in open_channels], [], [], timeout)
        got = False
        for channel in open_channels:
            if channel.fd in ready:
                got = channel.pump() or got
        return got

    def _expected(self, key: str) -> list[str] | None:
        return self.expectation(key) if self.expectation is not None else None

    def _exit_timeout(self, key: str, timeout: float) -> float:
        """How long to wait for an exit; not long where the daemon is known to stay."""
        expected = self._expected(key)
        return 0.5 if expected is not None and f"exit: {KILLED}" in expected else timeout

    def _wait_quiet(self) -> None:
        # QEMU's monitor reads one byte per main-loop iteration (~20 us a byte here), so a
        # long input needs a longer silence before its answer can be called missing.
        quiet = self.quiet + self._sent * 50e-6
        self._sent = 0
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline and self._pump(quiet):
            pass

    def _wait_for(self, expected: dict[str, int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            missing = [name for name, count in expected.items()
                       if name in self.channels and not self.channels[name].eof
                       and len(self.channels[name].lines) < count]
            if not missing:
                break
            self._pump(deadline - time.monotonic())
        end = time.monotonic() + self.grace
        while self._pump(max(0.0, end - time.monotonic())):
            pass

    def _finish(self, step: Step) -> None:
        """After the last operation: collect leftovers; a daemon still running is killed."""
        self._collect(step)
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.signal(signal.SIGKILL)
            wait_exit(self.daemon, EXIT_TIMEOUT)
            step.add("exit", "<still running at the end of the scenario: killed>")

    def _cleanup(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.signal(signal.SIGKILL)
            wait_exit(self.daemon, EXIT_TIMEOUT)
        for channel in list(self.channels.values()):
            with contextlib.suppress(OSError):
                channel.close()
        self.channels.clear()
        self.daemon = None
        _unmount_below(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- operations ------------------------------------------------------------

    def _args(self, op: Op) -> list[str]:
        return shlex.split(self.subs.apply(op.rest))

    def _op_file(self, op: Op, step: Step) -> None:
        """``file PATH SIZE``: a sparse file (setup, not a step)."""
        path, size = self._args(op)
        with open(path, "wb") as image:
            image.truncate(int(size))

    def _op_mkdir(self, op: Op, step: Step) -> None:
        os.makedirs(self.subs.apply(op.rest.strip()), exist_ok=True)

    def _start(self, op: Op, stdin: bool, prefix: str = "") -> Daemon:
        for name in [n for n, c in self.channels.items() if c.eof]:
            self.channels.pop(name).close()
        daemon = self.launcher.start(self._args(op), self.tmp, stdin)
        self.channels[prefix + "stdout"] = Channel("stdout", daemon.stdout_fd,
                                                   write_fd=daemon.stdin_fd)
        self.channels[prefix + "stderr"] = Channel("stderr", daemon.stderr_fd)
        return daemon

    def _daemon_running(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def _op_daemon(self, op: Op, step: Step) -> None:
        """``daemon ARGS``: starts a daemon (its stdin stays open for a stdio monitor)."""
        if self._daemon_running():
            raise ScenarioError(f"line {op.line}: a daemon is still running")
        self.daemon = self._start(op, stdin=True)

    def _op_run(self, op: Op, step: Step) -> None:
        """``run ARGS``: a daemon that is expected to end by itself (command-line errors).

        While a ``daemon`` runs, this second one's channels are called ``run.stdout``,
        ``run.stderr`` and ``run.exit``.
        """
        prefix = "run." if self._daemon_running() else ""
        process = self._start(op, stdin=False, prefix=prefix)
        self._reap(process, step, self._exit_timeout(op.key, 10.0), prefix=prefix)

    def _op_wait_exit(self, op: Op, step: Step) -> None:
        assert self.daemon is not None
        self._reap(self.daemon, step, self._exit_timeout(op.key, EXIT_TIMEOUT))

    def _reap(self, daemon: Daemon, step: Step, timeout: float, prefix: str = "") -> None:
        status = wait_exit(daemon, timeout)
        if status is None:
            daemon.signal(signal.SIGKILL)
            wait_exit(daemon, EXIT_TIMEOUT)
        # Once the daemon is gone the channels it held end; read them to the end.
        mine = [self.channels[prefix + name] for name in ("stdout", "stderr")
                if prefix + name in self.channels]
        if not prefix:
            mine = list(self.channels.values())
        deadline = time.monotonic() + 5.0
        while any(not c.eof for c in mine) and time.monotonic() < deadline:
            self._pump(0.1)
        for name in sorted(self.channels):
            channel = self.channels[name]
            for line in channel.lines:
                step.add(name, normalise(channel.name, line, self.subs))
            channel.lines = []
        step.add(prefix + "exit", KILLED if status is None else str(status))

    def _op_connect(self, op: Op, step: Step) -> None:
        """``connect NAME PATH`` (unix) or ``connect NAME HOST:PORT`` (TCP): a monitor."""
        name, where = self._args(op)
        sock = _connect(where)
        if sock is None:
            step.add(name, f"<cannot connect to {self.subs.revert(where)}>")
            return
        self.channels[name] = Channel(name, sock.fileno(), sock=sock, crlf=True)

    def _op_stdio(self, op: Op, step: Step) -> None:
        """``stdio NAME``: from now on the daemon's stdin/stdout are the monitor NAME."""
        (name,) = self._args(op)
        channel = self.channels.pop("stdout", None)
        if channel is None:
            step.add(name, "<no stdout>")
            return
        channel.name = name
        channel.crlf = True
        self.channels[name] = channel

    def _channel(self, step: Step, name: str) -> Channel | None:
        """The open channel NAME; a missing one (its connect failed) is noted in the step."""
        channel = self.channels.get(name)
        if channel is None:
            step.add(name, "<not connected>")
        return channel

    def _op_send(self, op: Op, step: Step) -> None:
        """``send NAME TEXT``: TEXT exactly as written, plus a newline."""
        name, payload = op.channel_and_payload()
        self._write(step, name, self.subs.apply(payload).encode() + b"\n")

    def _op_raw(self, op: Op, step: Step) -> None:
        """``raw NAME BYTES``: Python escapes (``\\x00``, ``\\n``), no newline added."""
        name, payload = op.channel_and_payload()
        data = codecs.escape_decode(self.subs.apply(payload).encode())[0]
        assert isinstance(data, bytes)
        self._write(step, name, data)

    def _op_expr(self, op: Op, step: Step) -> None:
        """``expr NAME PYTHON``: the bytes a Python expression makes (long inputs)."""
        name, payload = op.channel_and_payload()
        data = eval(payload, {"__builtins__": {}})  # scenario files are ours
        if not isinstance(data, bytes):
            raise ScenarioError(f"line {op.line}: expr must give bytes")
        self._write(step, name, data)

    def _write(self, step: Step, name: str, data: bytes) -> None:
        """Sends everything while still reading, so that neither side can block the other."""
        channel = self._channel(step, name)
        if channel is None:
            return
        deadline = time.monotonic() + 120.0
        view = memoryview(data)
        while view and time.monotonic() < deadline:
            readable = [c.fd for c in self._open_channels()]
            ready_r, ready_w, _ = select.select(readable, [channel.writable_fd()], [], 1.0)
            for other in self._open_channels():
                if other.fd in ready_r:
                    other.pump()
            if ready_w:
                try:
                    sent = os.write(channel.writable_fd(), view[:1 << 16])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    step.add(name, f"<send failed: {errno.errorcode.get(exc.errno or 0)}>")
                    return
                view = view[sent:]
                self._sent += sent

    def _op_close(self, op: Op, step: Step) -> None:
        (name,) = self._args(op)
        if self._channel(step, name) is not None:
            self.channels.pop(name).close()

    def _op_shutdown_write(self, op: Op, step: Step) -> None:
        """``shutdown-write NAME``: sends EOF but keeps reading the replies."""
        (name,) = self._args(op)
        channel = self._channel(step, name)
        if channel is None:
            return
        if channel.sock is not None:
            channel.sock.shutdown(socket.SHUT_WR)
        else:
            os.close(channel.write_fd)
            channel.write_fd = -1

    def _op_signal(self, op: Op, step: Step) -> None:
        (name,) = self._args(op)
        assert self.daemon is not None
        self.daemon.signal(getattr(signal, "SIG" + name))

    def _op_wait(self, op: Op, step: Step) -> None:
        """``wait``: a step that only collects what the daemon says on its own."""

    def _op_nbd(self, op: Op, step: Step) -> None:
        """``nbd NAME PATH EXPORT``: an NBD client does the handshake (NBD_OPT_GO)."""
        name, where, export = self._args(op)
        sock = _connect(where)
        if sock is None:
            step.add(name, f"<cannot connect to {self.subs.revert(where)}>")
            return
        try:
            for line in nbd_go(sock, export.encode()):
                step.add(name, line)
        except (OSError, ValueError) as exc:
            step.add(name, f"<handshake failed: {exc}>")
        self.channels[name] = Channel(name, sock.fileno(), sock=sock)


# -- helpers -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _connect(where: str, timeout: float = 10.0) -> socket.socket | None:
    """Connects, retrying while the daemon is still starting to listen."""
    deadline = time.monotonic() + timeout
    while True:
        if where.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = where
        else:
            host, _, port = where.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (host, int(port))
        try:
            sock.connect(address)  # type: ignore[arg-type]
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)


NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_INFO_EXPORT = 0
_OPT_MAGIC = b"IHAVEOPT"
_REP_MAGIC = 0x3E889045565A9


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("server closed the connection")
        data += chunk
    return data


def nbd_go(sock: socket.socket, export: bytes) -> list[str]:
    """The fixed-newstyle handshake up to NBD_OPT_GO; what the server said, as text."""
    sock.settimeout(10)
    magic, opt_magic, flags = struct.unpack(">8s8sH", _recv_exact(sock, 18))
    if magic != b"NBDMAGIC" or opt_magic != _OPT_MAGIC:
        raise ValueError(f"unexpected greeting {magic!r} {opt_magic!r}")
    lines = [f"handshake flags=0x{flags:x}"]
    sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    data = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    sock.sendall(_OPT_MAGIC + struct.pack(">II", NBD_OPT_GO, len(data)) + data)
    while True:
        magic_rep, option, reply, length = struct.unpack(">QIII", _recv_exact(sock, 20))
        if magic_rep != _REP_MAGIC or option != NBD_OPT_GO:
            raise ValueError("bad option reply")
        payload = _recv_exact(sock, length)
        if reply == NBD_REP_ACK:
            lines.append("go: ack")
            break
        if reply == NBD_REP_INFO and payload[:2] == struct.pack(">H", NBD_INFO_EXPORT):
            size, tflags = struct.unpack(">QH", payload[2:12])
            lines.append(f"go: export size={size} flags=0x{tflags:x}")
        elif reply == NBD_REP_INFO:
            lines.append(f"go: info {payload[:2].hex()} {payload[2:].hex()}")
        elif reply & 0x80000000:
            lines.append(f"go: error 0x{reply:x} {payload.decode(errors='replace')!r}")
            break
        else:
            lines.append(f"go: reply 0x{reply:x} {payload.hex()}")
    sock.settimeout(None)
    return lines


def _unmount_below(directory: str) -> None:
    """Lazily unmounts FUSE mounts a failed daemon may have left in the scenario's dir."""
    if not directory:
        return
    with open("/proc/mounts") as mounts:
        targets = [line.split()[1] for line in mounts]
    for target in targets:
        if f"{directory}/" in target:
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def run_scenario(launcher: Launcher, scenario: Scenario,
                 expectation: Expectation | None = None, settle: bool = False) -> list[Step]:
    return Runner(launcher, expectation, settle=settle).run(scenario)
