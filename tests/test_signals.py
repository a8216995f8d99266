"""SIGTERM and SIGINT end the daemon cleanly whatever it is doing.

Each case starts a daemon with a pidfile, a FUSE export of a file node, an NBD server and
an iothread, sends a signal at a moment drawn from a seeded generator (while it starts,
while fio hammers the export, while the export is being deleted, after a command failed
inside) and checks that the daemon is gone within 5 seconds and left neither its mount
nor its pidfile behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import QSD_DEPRECATIONS_FATAL, fuse_mounts

EXIT_SECONDS = 5.0
MiB = 1 << 20

# A command handler that fails inside, as a bug would: the daemon answers with an
# internal error and must still shut down cleanly afterwards.
FAILING_HANDLER = (
    "from qsd.commands import registry\n"
    "registry.load_all()\n"
    "async def broken(daemon, args):\n"
    "    raise RuntimeError('simulated bug')\n"
    "registry.HANDLERS['query-version'] = broken\n")


def qsd_command(extra: str = "") -> list[str]:
    code = "\n".join([QSD_DEPRECATIONS_FATAL, extra,
                      "import runpy",
                      "runpy.run_module('qsd', run_name='__main__', alter_sys=True)"])
    return [sys.executable, "-c", code]


class Daemon:
    """One daemon of the test, with its paths; stopped by PID whatever happens."""

    def __init__(self, work: Path, extra: str = "") -> None:
        self.work = work
        self.mountpoint = work / "export"
        self.mountpoint.touch()
        self.pidfile = work / "qsd.pid"
        self.qmp = work / "qmp.sock"
        image = work / "disk.raw"
        with open(image, "wb") as f:
            f.truncate(64 * MiB)
        self.start = time.monotonic()
        self.proc = subprocess.Popen(qsd_command(extra) + [
            "--pidfile", str(self.pidfile),
            "--chardev", f"socket,id=m0,path={self.qmp},server=on,wait=off",
            "--monitor", "m0",
            "--object", "iothread,id=io0",
            "--blockdev", f"file,node-name=file0,filename={image}",
            "--nbd-server", f"addr.type=unix,addr.path={work / 'nbd.sock'}",
            "--export", f"fuse,id=fuse0,node-name=file0,mountpoint={self.mountpoint},"
                        "writable=on,iothread=io0",
        ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def mounted(self) -> bool:
        return str(self.mountpoint) in fuse_mounts()

    def wait_ready(self) -> None:
        """Until the pidfile exists: QEMU writes it once every option is applied."""
        deadline = time.monotonic() + 30
        while not self.pidfile.exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.005)
        assert self.mounted()

    def qmp_send(self, *commands: bytes) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.qmp))
        sock.settimeout(20)
        sock.recv(4096)  # the greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}\n' + b"".join(commands))
        return sock

    def signal_and_check(self, signum: int) -> None:
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon still runs {EXIT_SECONDS} s after signal {signum}")
        stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
        assert code in (0, -signum), stderr
        assert not self.mounted(), "the FUSE export is still mounted"
        assert not self.pidfile.exists(), "the pidfile is still there"
        assert "Traceback" not in stderr or "simulated bug" in stderr, stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self.mounted():
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


@pytest.fixture
def work() -> Iterator[Path]:
    """Outside pytest's basetemp, which other pytest runs on the machine may rename."""
    path = Path(tempfile.mkdtemp(prefix="qsd-signals-", dir="/tmp"))
    yield path
    if str(path / "export") in fuse_mounts():
        subprocess.run(["umount", "-l", str(path / "export")], check=False)
    shutil.rmtree(path, ignore_errors=True)


def fio_load(daemon: Daemon) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["fio", "--name=load", f"--filename={daemon.mountpoint}", "--direct=1", "--bs=4k",
         "--rw=randrw", "--ioengine=libaio", "--iodepth=16", "--numjobs=2",
         "--size=16m", "--time_based", "--runtime=30", "--thread"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def stop_fio(fio: subprocess.Popen[bytes]) -> None:
    """fio runs its jobs as threads (--thread): job processes put themselves in sessions
    of their own, so neither killing the parent nor its process group reached them, and
    they were left running for hours.  With its file gone, fio has nothing left to show."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(fio.pid, signal.SIGKILL)
    fio.wait()


MOMENTS = ["start-up"] * 7 + ["fio"] * 6 + ["export-del"] * 4 + ["after-bug"] * 3
# SIGINT too, now and then; during start-up it may come before Python runs any of qsd's
# code (its own handler raises KeyboardInterrupt then), so those get SIGTERM only.
CASES = [(index, moment, signal.SIGINT if index % 4 == 3 and moment != "start-up"
          else signal.SIGTERM) for index, moment in enumerate(MOMENTS)]


@pytest.mark.parametrize(("index", "moment", "signum"), CASES,
                         ids=[f"{i}-{m}-{s.name}" for i, m, s in CASES])
def test_signal_at_a_random_moment(work: Path, index: int, moment: str,
                                   signum: signal.Signals) -> None:
    rng = random.Random(1900 + index)
    daemon = Daemon(work, FAILING_HANDLER if moment == "after-bug" else "")
    fio = None
    try:
        if moment == "start-up":
            # Anywhere from the exec to just after the export is up.
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            daemon.wait_ready()
        if moment == "fio":
            fio = fio_load(daemon)
            time.sleep(rng.uniform(0.3, 1.5))
        elif moment == "export-del":
            fio = fio_load(daemon)
            time.sleep(rng.uniform(0.1, 0.5))
            sock = daemon.qmp_send(b'{"execute": "block-export-del", '
                                   b'"arguments": {"id": "fuse0", "mode": "hard"}}\n')
            time.sleep(rng.uniform(0.0, 0.05))
            sock.close()
        elif moment == "after-bug":
            sock = daemon.qmp_send(b'{"execute": "query-version"}\n')
            reply = b""
            while b"internal error" not in reply:
                chunk = sock.recv(4096)
                assert chunk, reply
                reply += chunk
            sock.close()
        daemon.signal_and_check(signum)
    finally:
        daemon.kill()
        if fio is not None:
            stop_fio(fio)
