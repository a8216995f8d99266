"""Churn, load and leaks: the daemon after many exports, clients, monitors and iothreads.

Each case runs a workload against one daemon (started with the leak probe) and compares
its counters (tests/leaks.py: fds, threads, FUSE mounts, asyncio tasks, resident memory)
after a warm-up with those after the workload: every count must come back, memory may
grow by 5% at most.  `make test` runs each case a few rounds, `make stress` (QSD_STRESS=1)
at the scale docs/RELIABILITY.md reports: 1,000 export add/del cycles while fio loads
another export, 64 concurrent NBD clients some of whose requests fail on purpose, 16
monitors issuing commands (and garbage) while exports change, iothreads added and
removed while their node serves I/O.  Each case prints its figures as one
``STRESS {json}`` line.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.harness import Monitor, Qsd, RawMonitor, wait_for_listener
from tests.leaks import Counters, assert_no_leaks, settled

FULL = os.environ.get("QSD_STRESS") == "1"
MiB = 1 << 20
ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="the stress cases mount FUSE exports (root, /dev/fuse)")


def scale(full: int, smoke: int) -> int:
    return full if FULL else smoke


def report(case: str, started: float, before: Counters, after: Counters,
           **figures: Any) -> None:
    line = {"case": case, "full": FULL, "seconds": round(time.monotonic() - started, 1),
            **figures, "before": before.figures(), "after": after.figures()}
    print(f"\nSTRESS {json.dumps(line)}")


class Daemon:
    """A daemon with the leak probe in a short private directory, ended by PID."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        self.workdir = workdir
        self.qsd = Qsd(workdir, args, probe=True)
        wait_for_listener(self.qsd.probe_path, self.qsd.proc)
        self.monitor = Monitor(self.qsd)

    def image(self, name: str, size: int = 64 * MiB) -> Path:
        path = self.workdir / f"{name}.raw"
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def delete_export(self, export_id: str) -> None:
        """block-export-del, once the last client has let go (a FUSE RELEASE or an NBD
        disconnect can still be on its way after the client returned; QEMU's answer is
        the same then)."""
        deadline = time.monotonic() + 30
        while "error" in (reply := self.monitor.cmd("block-export-del", id=export_id)):
            assert reply["error"]["desc"] == f"export '{export_id}' still in use", reply
            assert time.monotonic() < deadline, reply
            time.sleep(0.01)
        event = self.monitor.wait_event("BLOCK_EXPORT_DELETED", timeout=60)
        assert event["data"] == {"id": export_id}

    def stderr_is_clean(self) -> None:
        """Nothing escaped: no traceback, no handler bug on stderr."""
        stderr = self.qsd.read_stderr()
        assert "Traceback" not in stderr and "internal error" not in stderr, stderr


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []
    workdir = Path(tempfile.mkdtemp(prefix="qsd-stress-", dir="/tmp"))

    def start(*args: str) -> Daemon:
        daemon = Daemon(workdir, list(args))
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.monitor.raw.close()
            daemon.qsd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def uring() -> Iterator[bool]:
    """Whether FUSE over io_uring can be used; enabled for the test where the kernel
    has it, and put back as it was."""
    if not ENABLE_URING.exists():
        yield False
        return
    before = ENABLE_URING.read_text().strip()
    ENABLE_URING.write_text("Y")
    try:
        yield True
    finally:
        ENABLE_URING.write_text(before)


class Fio:
    """fio loading a file in the background, for as long as the case runs; ended by its
    process group, its summary checked."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            ["fio", "--name=load", f"--filename={path}", "--direct=1", "--bs=4k",
             "--rw=randrw", "--ioengine=psync", "--size=32M", "--time_based",
             "--runtime=3600", "--output-format=json", "--thread"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        # Until its job has the file open, fio dies of SIGINT without a summary.
        deadline = time.monotonic() + 60
        while not self._has_open(path):
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "fio did not open its file"
            time.sleep(0.05)

    def _has_open(self, path: Path) -> bool:
        """Whether fio's job (a thread: job processes put themselves in sessions of their
        own, out of reach of a kill of fio's process group) has ``path`` open."""
        fds = f"/proc/{self.proc.pid}/fd"
        try:
            return any(os.readlink(f"{fds}/{fd}") == str(path) for fd in os.listdir(fds))
        except OSError:
            return False

    def kill(self) -> None:
        """After a failure: a job stuck in the kernel on an export that no longer answers
        keeps fio's pipes open, so this does not wait for it forever."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
            raise AssertionError("fio did not end") from None
        assert b"{" in out, err.decode()
        job: dict[str, Any] = json.loads(out[out.index(b"{"):])["jobs"][0]
        return job


# ---- export add/del under load -----------------------------------------------------------


def _fuse_exercise(mountpoint: Path) -> None:
    """INIT, GETATTR, a read and a write through the new mount."""
    fd = os.open(mountpoint, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\x5a" * 4096, 4096) == 4096
        assert os.pread(fd, 4096, 4096) == b"\x5a" * 4096
    finally:
        os.close(fd)


def _nbd_exercise(uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\xa5" * 4096, 8192)
    assert h.pread(4096, 8192) == b"\xa5" * 4096
    h.shutdown()


def _vhost_exercise(path: Path) -> None:
    """A front-end that connects and goes away."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))


def test_export_churn(daemon_factory: Callable[..., Daemon], uring: bool) -> None:
    """Exports of every kind added, used and deleted over and over while fio loads
    another export of the same daemon."""
    nbd_sock = Path(tempfile.mkdtemp(prefix="qsd-stress-", dir="/tmp")) / "nbd.sock"
    d = daemon_factory("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}")
    try:
        m = d.monitor
        for name in ("load", "churn"):
            m.ok("blockdev-add", driver="file", **{"node-name": name},
                 filename=str(d.image(name)))
        load_mp = d.workdir / "load.fuse"
        load_mp.touch()
        m.ok("block-export-add", type="fuse", id="load", **{"node-name": "load"},
             mountpoint=str(load_mp), writable=True, iothread="io1")
        churn_mp = d.workdir / "churn.fuse"
        churn_mp.touch()
        vhost = d.workdir / "vu.sock"
        fuse = {"type": "fuse", "mountpoint": str(churn_mp), "writable": True}
        kinds: list[tuple[str, dict[str, Any], Callable[[], None]]] = [
            ("fuse", fuse, lambda: _fuse_exercise(churn_mp)),
            ("fuse-iothread", {**fuse, "iothread": "io0"}, lambda: _fuse_exercise(churn_mp)),
            ("fuse-2-iothreads", {**fuse, "iothread": ["io0", "io1"]},
             lambda: _fuse_exercise(churn_mp)),
            ("nbd", {"type": "nbd", "writable": True},
             lambda: _nbd_exercise(f"nbd+unix:///churn?socket={nbd_sock}")),
            ("vhost-user-blk", {"type": "vhost-user-blk", "writable": True,
                                "addr": {"type": "unix", "path": str(vhost)}},
             lambda: _vhost_exercise(vhost)),
        ]
        if uring:
            kinds.append(("fuse-io-uring", {**fuse, "iothread": "io0", "io-uring": "on"},
                          lambda: _fuse_exercise(churn_mp)))

        def cycle(kind: tuple[str, dict[str, Any], Callable[[], None]]) -> None:
            _, args, exercise = kind
            m.ok("block-export-add", id="churn", **{"node-name": "churn"}, **args)
            exercise()
            d.delete_export("churn")

        fio = Fio(load_mp)
        try:
            for kind in kinds:                     # warm-up: every kind once
                cycle(kind)
            before = settled(d.qsd)
            started = time.monotonic()
            cycles = scale(1000, len(kinds))
            for i in range(cycles):
                cycle(kinds[i % len(kinds)])
            duration = time.monotonic() - started
        except BaseException:
            fio.kill()
            raise
        job = fio.stop()
        assert job["error"] == 0, job
        moved = job["read"]["io_bytes"] + job["write"]["io_bytes"]
        assert moved > 0
        after = assert_no_leaks(d.qsd, before)
        d.stderr_is_clean()
        report("export add/del cycles under fio load", started, before, after,
               cycles=cycles, kinds=[k[0] for k in kinds], cycles_per_second=round(
                   cycles / duration, 1), fio_requests=job["read"]["total_ios"]
               + job["write"]["total_ios"])
    finally:
        shutil.rmtree(nbd_sock.parent, ignore_errors=True)


# ---- many NBD clients, some of whose requests fail --------------------------------------------

SECTOR = 64                     # the sector the faulty disk fails
BAD = SECTOR * 512


def _client(uri: str, region: int, requests: int, faulty: bool, rnd: random.Random,
            errors: list[BaseException], counts: list[tuple[int, int]]) -> None:
    """Connects, writes and reads back blocks of its own region, disconnects; on the
    faulty disk every request to the bad sector must fail with EIO and the connection go
    on serving."""
    try:
        h = nbd.NBD()
        h.set_request_structured_replies(False)     # a read error keeps the connection
        h.connect_uri(uri)
        done = failed = 0
        for _ in range(requests):
            if faulty and rnd.random() < 0.25:
                with pytest.raises(nbd.Error) as error:
                    if rnd.random() < 0.5:
                        h.pread(4096, BAD)
                    else:
                        h.pwrite(b"\xee" * 4096, BAD)
                assert error.value.errno == errno.errorcode[errno.EIO]
                failed += 1
                continue
            offset = region + rnd.randrange(16) * 4096
            data = rnd.randbytes(4096)
            h.pwrite(data, offset)
            assert h.pread(4096, offset) == data
            done += 2
        h.shutdown()
        counts.append((done, failed))
    except BaseException as e:   # noqa: BLE001 - handed to the test's thread
        errors.append(e)


def test_many_nbd_clients(daemon_factory: Callable[..., Daemon]) -> None:
    """Rounds of concurrent NBD clients, half of them on a disk whose one sector fails
    every read and write (blkdebug): each gets its data or EIO, and when they are gone
    the daemon holds nothing of them."""
    sock = Path(tempfile.mkdtemp(prefix="qsd-stress-", dir="/tmp")) / "nbd.sock"
    d = daemon_factory("--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=0")
    try:
        clients, rounds, requests = scale(64, 8), scale(20, 2), scale(50, 10)
        m = d.monitor
        m.ok("blockdev-add", driver="file", **{"node-name": "good"},
             filename=str(d.image("good", clients * 65536 + MiB)))
        m.ok("blockdev-add", driver="file", **{"node-name": "f-bad"},
             filename=str(d.image("bad", clients * 65536 + MiB)))
        # One rule per event, each failing reads and writes of the sector: the event of
        # whichever request came last arms its rule (and disarms the other), so the
        # sector fails whatever the clients interleave.
        m.ok("blockdev-add", driver="blkdebug", **{"node-name": "d-bad"}, image="f-bad",
             **{"inject-error": [{"event": "read_aio", "sector": SECTOR},
                                 {"event": "write_aio", "sector": SECTOR}]})
        m.ok("blockdev-add", driver="raw", **{"node-name": "bad"}, file="d-bad")
        for name in ("good", "bad"):
            m.ok("block-export-add", type="nbd", id=name, **{"node-name": name},
                 writable=True)

        def run_round(seed: int, n: int) -> list[tuple[int, int]]:
            errors: list[BaseException] = []
            counts: list[tuple[int, int]] = []
            threads = [threading.Thread(target=_client, args=(
                f"nbd+unix:///{'bad' if i % 2 else 'good'}?socket={sock}", MiB + i * 65536,
                requests, bool(i % 2), random.Random(seed * 1000 + i), errors, counts))
                for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert not any(t.is_alive() for t in threads), "a client hangs"
            if errors:
                raise errors[0]
            return counts

        run_round(0, clients)                          # warm-up
        before = settled(d.qsd)
        started = time.monotonic()
        total = failed = 0
        for r in range(rounds):
            counts = run_round(r + 1, clients)
            total += sum(done + fails for done, fails in counts)
            failed += sum(fails for _, fails in counts)
        after = assert_no_leaks(d.qsd, before)
        d.stderr_is_clean()
        report("concurrent NBD clients with injected errors", started, before, after,
               clients=clients, rounds=rounds, connections=clients * rounds,
               requests=total, injected_errors=failed)
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)


# ---- monitors while exports change ------------------------------------------------------------

ABUSE = [
    b'{"execute": "query-version"',                        # cut off by a disconnect
    b'{"execute": ' + b"1" * 5000 + b"}\n",
    b"[" * 2000 + b"]" * 2000 + b"\n",
    b'{"execute": "no-such-command"}\n',
    b'{"execute": "blockdev-add", "arguments": {"driver": "nope"}}\n',
    b"\xff\xfe garbage }}}\n",
    b'{"execute": "query-named-block-nodes", "arguments": [1]}\n',
]


def _monitor_worker(path: Path, index: int, commands: int, sock: Path,
                    errors: list[BaseException], counts: list[int]) -> None:
    """One monitor's client: its own node and NBD export added and deleted, queries,
    and abuse; now and then it drops the connection and comes back."""
    rnd = random.Random(index)
    node, export = f"n{index}", f"e{index}"
    sent = 0
    try:
        raw = RawMonitor(path)
        raw.sock.settimeout(60)
        raw.negotiate()

        def cmd(name: str, **args: Any) -> dict[str, Any]:
            nonlocal sent
            raw.send(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
            sent += 1
            while True:
                reply: dict[str, Any] = json.loads(raw.recv_line())
                if "event" not in reply:
                    return reply

        while sent < commands:
            step = rnd.randrange(6)
            if step == 0:
                assert "return" in cmd("blockdev-add", driver="null-co",
                                       **{"node-name": node}, size=MiB,
                                       **{"read-zeroes": True})
                assert "return" in cmd("block-export-add", type="nbd", id=export,
                                       **{"node-name": node})
                h = nbd.NBD()
                h.connect_uri(f"nbd+unix:///{node}?socket={sock}")
                assert h.pread(512, 0) == bytes(512)
                h.shutdown()
                assert "return" in cmd("block-export-del", id=export)
                # The export lets go of its node once it is gone (the deletion event).
                deadline = time.monotonic() + 30
                while "error" in cmd("blockdev-del", **{"node-name": node}):
                    assert time.monotonic() < deadline, "node stays in use"
                    time.sleep(0.01)
            elif step in (1, 2):
                name = rnd.choice(["query-version", "query-block-exports",
                                   "query-named-block-nodes", "query-block", "query-chardev",
                                   "query-commands", "query-qmp-schema", "query-jobs"])
                assert "return" in cmd(name)
            elif step == 3:
                bad = rnd.choice(ABUSE)
                if not bad.endswith(b"\n"):
                    raw.send(bad)
                    raw.close()
                    raw = RawMonitor(path)
                    raw.sock.settimeout(60)
                    raw.negotiate()
                else:
                    # Garbage may earn several errors: all of them come before the
                    # answer to the marker that follows.
                    raw.send(bad + b'{"execute": "query-version", "id": "marker"}\n')
                    errors_seen = 0
                    while True:
                        reply = json.loads(raw.recv_line())
                        if reply.get("id") == "marker":
                            assert "return" in reply, reply
                            break
                        if "event" not in reply:
                            assert set(reply) == {"error"}, reply
                            errors_seen += 1
                    assert errors_seen, bad
            elif step == 4:
                reply = cmd("blockdev-del", **{"node-name": f"missing{index}"})
                assert reply["error"]["desc"] == \
                    f"Failed to find node with node-name='missing{index}'"
            else:
                raw.close()                                  # reconnect
                raw = RawMonitor(path)
                raw.sock.settimeout(60)
                raw.negotiate()
        raw.close()
        counts.append(sent)
    except BaseException as e:   # noqa: BLE001 - handed to the test's thread
        errors.append(e)


def test_monitors_while_exports_change(daemon_factory: Callable[..., Daemon]) -> None:
    """16 monitors at once, each changing nodes and exports of its own, querying, sending
    garbage and reconnecting; every command gets its reply and nothing stays behind."""
    monitors = scale(16, 4)
    commands = scale(400, 25)
    tmp = Path(tempfile.mkdtemp(prefix="qsd-stress-", dir="/tmp"))
    try:
        sock = tmp / "nbd.sock"
        args = ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
        paths = []
        for i in range(monitors):
            path = tmp / f"m{i}.sock"
            args += ["--chardev", f"socket,id=mon{i},path={path},server=on,wait=off",
                     "--monitor", f"mon{i}"]
            paths.append(path)
        d = daemon_factory(*args)

        def run_all(n: int) -> int:
            errors: list[BaseException] = []
            counts: list[int] = []
            threads = [threading.Thread(target=_monitor_worker,
                                        args=(paths[i], i, n, sock, errors, counts))
                       for i in range(monitors)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            assert not any(t.is_alive() for t in threads), "a monitor hangs"
            if errors:
                raise errors[0]
            return sum(counts)

        run_all(10)                                     # warm-up
        before = settled(d.qsd)
        started = time.monotonic()
        sent = run_all(commands)
        assert d.monitor.ok("query-block-exports") == []
        after = assert_no_leaks(d.qsd, before)
        report("monitors while exports change", started, before, after,
               monitors=monitors, commands=sent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- iothreads that come and go under I/O -------------------------------------------------------


def test_iothreads_come_and_go_under_io(daemon_factory: Callable[..., Daemon]) -> None:
    """A node exported over NBD moves from iothread to iothread (each created for it
    and deleted after it left) while a client writes and reads back without pause."""
    tmp = Path(tempfile.mkdtemp(prefix="qsd-stress-", dir="/tmp"))
    try:
        sock = tmp / "nbd.sock"
        d = daemon_factory("--nbd-server", f"addr.type=unix,addr.path={sock}")
        m = d.monitor
        m.ok("blockdev-add", driver="file", **{"node-name": "disk"},
             filename=str(d.image("disk", 16 * MiB)))
        m.ok("block-export-add", type="nbd", id="disk", **{"node-name": "disk"},
             writable=True)
        stop = threading.Event()
        errors: list[BaseException] = []
        requests = [0]

        def client() -> None:
            try:
                rnd = random.Random(7)
                h = nbd.NBD()
                h.connect_uri(f"nbd+unix:///disk?socket={sock}")
                while not stop.is_set():
                    offset = rnd.randrange(4096) * 4096
                    data = rnd.randbytes(4096)
                    h.pwrite(data, offset)
                    assert h.pread(4096, offset) == data
                    requests[0] += 2
                h.shutdown()
            except BaseException as e:   # noqa: BLE001 - handed to the test's thread
                errors.append(e)

        def move(i: int) -> None:
            m.ok("object-add", **{"qom-type": "iothread", "id": f"io{i}"})
            m.ok("x-blockdev-set-iothread", **{"node-name": "disk"}, iothread=f"io{i}",
                 force=True)
            if i:
                m.ok("object-del", id=f"io{i - 1}")

        worker = threading.Thread(target=client)
        worker.start()
        try:
            move(0)                                          # warm-up
            m.ok("x-blockdev-set-iothread", **{"node-name": "disk"}, iothread=None,
                 force=True)
            m.ok("object-del", id="io0")
            before = settled(d.qsd)
            started = time.monotonic()
            moves = scale(300, 50)
            for i in range(moves):
                move(i)
            m.ok("x-blockdev-set-iothread", **{"node-name": "disk"}, iothread=None,
                 force=True)
            m.ok("object-del", id=f"io{moves - 1}")
        finally:
            stop.set()
            worker.join(60)
        assert not worker.is_alive() and not errors, errors
        assert requests[0] > 0
        after = assert_no_leaks(d.qsd, before)
        d.stderr_is_clean()
        report("iothreads added and removed under I/O", started, before, after,
               moves=moves, requests=requests[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
