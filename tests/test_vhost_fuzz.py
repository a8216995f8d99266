"""Fuzzing the vhost-user-blk export with a hostile front-end: random messages, random
descriptors, random rings, random requests.

qsd must answer or drop the connection, never crash, never stop serving, and leave no
descriptor or mapping behind.  ``make test`` runs a few thousand requests; set
QSD_FUZZ_REQUESTS (``make fuzz`` sets 100000) for the long run and QSD_FUZZ_SEED to
replay one.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import Qsd
from tests.vhost_user import (
    DESC,
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    GET_QUEUE_NUM,
    GPA_BASE,
    Disconnected,
    Frontend,
    PackedDriver,
    Request,
    SplitDriver,
)

MiB = 1024 * 1024
REQUESTS = int(os.environ.get("QSD_FUZZ_REQUESTS", "3000"))
SEED = int(os.environ.get("QSD_FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))
# The request types the fuzzer picks from: the real ones, more often than the rest.
TYPES = [0, 1, 4, 8, 11, 13] * 4 + [2, 3, 5, 12, 0x80000000, 0xFFFFFFFF]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-fuzz-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _guest_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum("memfd:guest-ram" in line for line in maps)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Fuzzer:
    """One hostile front-end session after another against one export."""

    def __init__(self, daemon: Qsd, sock: str, rnd: random.Random) -> None:
        self.daemon = daemon
        self.sock = sock
        self.rnd = rnd
        self.requests = 0
        self.sessions = 0
        self.dropped = 0

    # ---- sessions ---------------------------------------------------------------------

    def session(self) -> None:
        """A connection doing one kind of mischief; it may be dropped by qsd at any point."""
        self.sessions += 1
        fe = Frontend(self.sock)
        try:
            kind = self.rnd.random()
            if kind < 0.15:
                self.messages(fe)
            else:
                self.rings(fe, packed=kind > 0.6)
        except (Disconnected, BrokenPipeError, ConnectionResetError):
            self.dropped += 1
        except Exception as exc:
            raise AssertionError(f"seed {SEED}, session {self.sessions}") from exc
        finally:
            fe.close()

    def messages(self, fe: Frontend) -> None:
        """Random vhost-user messages: real request codes with wrong sizes, values and
        descriptors, and codes that do not exist."""
        rnd = self.rnd
        for _ in range(rnd.randrange(1, 30)):
            request = rnd.choice([*range(0, 45), rnd.randrange(1 << 32)])
            size = rnd.choice([0, 4, 8, 12, 20, 24, 40, 64, 96, 108, 200, 272, 273])
            payload = bytes(rnd.getrandbits(8) for _ in range(size))
            fds = [self.random_fd() for _ in range(rnd.choice([0, 0, 0, 1, 1, 2, 8, 9]))]
            try:
                fe.send(request, payload, flags=rnd.choice([1, 1, 9, 0, 5]), fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)
            self.requests += 1
        self.sync(fe)

    @staticmethod
    def sync(fe: Frontend) -> None:
        """A round trip: whatever replies the mischief earned come first."""
        fe.send(GET_QUEUE_NUM)
        while True:
            request, _, _, fds = fe.recv()
            for fd in fds:
                os.close(fd)
            if request == GET_QUEUE_NUM:
                return

    def random_fd(self) -> int:
        choice = self.rnd.randrange(4)
        if choice == 0:
            return os.eventfd(0)
        if choice == 1:
            fd = os.memfd_create("fuzz", os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, self.rnd.choice([0, 4096, MiB]))
            return fd
        if choice == 2:
            r, w = os.pipe()
            os.close(w)
            return r
        return os.open("/dev/null", os.O_RDWR)

    def rings(self, fe: Frontend, *, packed: bool) -> None:
        """A properly set-up device whose driver then writes requests and rings that are
        partly valid and partly not."""
        rnd = self.rnd
        fe.setup(2, mem_size=4 * MiB, num=rnd.choice([8, 64, 256]), packed=packed,
                 event_idx=rnd.random() < 0.5, indirect=rnd.random() < 0.5)
        for _ in range(rnd.randrange(1, 12)):
            queue = rnd.randrange(2)
            batch = rnd.randrange(1, 24)
            if rnd.random() < 0.2:
                # The ring is the driver's nonsense from here on: no more requests.
                self.garbage(fe, queue, batch)
                fe.kick(queue)
                self.sync(fe)
                return
            submitted = 0
            for _ in range(batch):
                if fe.submit(queue, self.request(), kick=False) is None:
                    break
                submitted += 1
            self.requests += submitted
            fe.kick(queue)
            if rnd.random() < 0.05:
                return      # gone with requests in flight
            fe.wait(queue, submitted, timeout=20)

    def request(self) -> Request:
        rnd = self.rnd
        rtype = rnd.choice(TYPES)
        sector = rnd.choice([0, 1, 7, 8, 1000, 16383, 16384, 1 << 40, rnd.randrange(1 << 64)])
        if rtype in (11, 13) and rnd.random() < 0.8:
            count = rnd.choice([0, 1, 8, 32768, 32769])
            flags = rnd.choice([0, 0, 1, 2])
            return Request(rtype, 0, data=struct.pack("<QII", rnd.randrange(20000), count,
                                                      flags)[:rnd.choice([16, 16, 16, 8])])
        size = rnd.choice([0, 1, 511, 512, 4096, 8192, 65536])
        if rtype == 1:
            return Request(rtype, sector, data=rnd.randbytes(size))
        return Request(rtype, sector, read_len=size)

    def garbage(self, fe: Frontend, queue: int, count: int) -> None:
        """Descriptors and ring indices that are random, some pointing into memory."""
        rnd = self.rnd
        mem = fe.mem
        assert mem is not None
        driver = fe.queues[queue]

        def addr() -> int:
            return rnd.choice([GPA_BASE + rnd.randrange(mem.size), rnd.randrange(1 << 64),
                               GPA_BASE + mem.size - 8, 0])

        def desc() -> bytes:
            flags = rnd.getrandbits(16) if rnd.random() < 0.3 else rnd.choice(
                [0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE, DESC_F_INDIRECT])
            return DESC.pack(addr(), rnd.choice([0, 1, 16, 17, 4096, 1 << 31, 0xFFFFFFFF]),
                             flags if isinstance(driver, SplitDriver)
                             else rnd.randrange(1 << 16), rnd.randrange(1 << 16)
                             if isinstance(driver, SplitDriver) else flags)

        if isinstance(driver, SplitDriver):
            for i in rnd.sample(range(driver.num), min(count, driver.num)):
                mem.write(driver.desc + 16 * i, desc())
            for _ in range(count):
                mem.write(driver.avail + 4 + 2 * (driver.avail_idx % driver.num),
                          struct.pack("<H", rnd.choice([rnd.randrange(driver.num),
                                                        rnd.randrange(1 << 16)])))
                driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
            idx = driver.avail_idx if rnd.random() < 0.8 else rnd.randrange(1 << 16)
            mem.write(driver.avail + 2, struct.pack("<H", idx))
        else:
            assert isinstance(driver, PackedDriver)
            wrap = DESC_F_AVAIL if driver.wrap else DESC_F_USED
            for _ in range(min(count, driver.free_slots)):
                raw = bytearray(desc())
                flags = struct.unpack_from("<H", raw, 14)[0] & ~(DESC_F_AVAIL | DESC_F_USED)
                struct.pack_into("<H", raw, 14, flags | wrap)
                mem.write(driver.ring + 16 * driver.next, bytes(raw))
                driver.next = (driver.next + 1) % driver.num
        self.requests += count

    # ---- checks ------------------------------------------------------------------------

    def still_serving(self) -> None:
        """qsd is alive and a well-behaved front-end gets its data."""
        assert self.daemon.proc.poll() is None, f"qsd died (seed {SEED})"
        fe = Frontend(self.sock)
        try:
            fe.setup(1, mem_size=MiB)
            data = self.rnd.randbytes(4096)
            assert fe.write(0, 64, data) == 0, f"seed {SEED}"
            assert fe.read(0, 64, 4096) == (0, data), f"seed {SEED}"
        finally:
            fe.close()


def _settled(daemon: Qsd, sock: str) -> tuple[int, int]:
    """qsd's descriptors and guest mappings with one idle front-end connected (the
    previous one is fully torn down once the next is served)."""
    probe = Frontend(sock)
    try:
        probe.u64(GET_QUEUE_NUM)
        return _fds(daemon.pid), _guest_mappings(daemon.pid)
    finally:
        probe.close()


def test_fuzz(workdir: Path, start_qsd: QsdFactory) -> None:
    img = workdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    sock = str(workdir / "vu.sock")
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--blockdev", f"file,node-name=disk,filename={img},discard=unmap",
                       "--export", f"vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                                   f"addr.path={sock},writable=on,num-queues=2,"
                                   "iothread.0=io0,iothread.1=io1")
    fuzzer = Fuzzer(daemon, sock, random.Random(SEED))
    fuzzer.still_serving()
    baseline = _settled(daemon, sock)
    assert baseline[1] == 0
    rss_after_warmup = 0
    start = time.monotonic()
    while fuzzer.requests < REQUESTS:
        fuzzer.session()
        # QEMU's reports of what the front-end got wrong, and nothing else: a Python
        # exception would mean qsd met something it did not expect.
        report = daemon.read_stderr()
        assert "Traceback" not in report and "dropping the front-end" not in report, (
            f"seed {SEED}: {report}")
        if fuzzer.sessions % 50 == 0:
            fuzzer.still_serving()
            assert _settled(daemon, sock) == baseline, f"leak (seed {SEED})"
            rss = _rss_kib(daemon.pid)
            if not rss_after_warmup and fuzzer.requests > REQUESTS // 4:
                rss_after_warmup = rss
            elif rss_after_warmup:
                assert rss < rss_after_warmup + 64 * 1024, f"memory grows (seed {SEED})"
    fuzzer.still_serving()
    assert _settled(daemon, sock) == baseline, f"leak (seed {SEED})"
    elapsed = time.monotonic() - start
    print(f"fuzz: seed {SEED}, {fuzzer.requests} requests in {fuzzer.sessions} sessions "
          f"({fuzzer.dropped} dropped by qsd), {elapsed:.1f}s")
