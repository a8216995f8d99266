"""The FUSE request decoder, fed requests as /dev/fuse delivers them, without the kernel.

A FuseQueue serves one end of a SOCK_SEQPACKET socketpair (one read, one request, like
/dev/fuse) for a FuseFile over a real image on a small tmpfs of the test's; hypothesis
writes well-formed and malformed requests to the other end, one at a time: any opcode,
header lengths that lie, bodies cut short or too long, offsets and sizes at and past
every limit.  For each request:

- a header whose length is not what was read halts the queue (QEMU's
  fuse_export_halt), with its message on stderr, and nothing is answered;
- FORGET and BATCH_FORGET get no answer, every other request exactly one, with its
  ``unique``, a length that is what was written, and an errno or success; the decoder
  never fails itself (its catch-all answers EIO and says "failed:" on stderr);
- what a READ answers is what the image holds there, up to its end; what a WRITE
  acknowledges is in the image; GETATTR reports the image's size.

After each example the queue stops with nothing in flight.  A few thousand examples in
`make test`; QSD_FUZZ=1 (`make stress`) runs 20,000 (about 100,000 requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd import qapi
from qsd.aio import AioContext, set_main_context
from qsd.block.backend import BlockBackend
from qsd.block.graph import BlockGraph
from qsd.block.permissions import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE
from qsd.export.fuse import protocol as P
from qsd.export.fuse.ops import FuseFile
from qsd.export.fuse.queue import BUFFER_SIZE, FuseQueue
from qsd.iothread import IOThread

EXAMPLES = 20000 if os.environ.get("QSD_FUZZ") == "1" else 1500
MiB = 1 << 20
DISK = MiB
NO_REPLY = (P.FORGET, P.BATCH_FORGET)
# <asm-generic/socket.h>: buffer sizes past net.core.*mem_max, for root
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
OPCODES = [P.LOOKUP, P.FORGET, P.GETATTR, P.SETATTR, P.OPEN, P.READ, P.WRITE, P.STATFS,
           P.RELEASE, P.FSYNC, P.FLUSH, P.INIT, P.INTERRUPT, P.DESTROY, P.BATCH_FORGET,
           P.FALLOCATE, P.LSEEK]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs for its image")


@dataclass
class Disk:
    ctx: AioContext
    blk: BlockBackend
    image: Path


@pytest.fixture(scope="module")
def disk() -> Iterator[Disk]:
    """A file node over an image on a 64 MiB tmpfs (what fallocate and growing writes
    may fill), in a loop thread of its own that is the block layer's main context."""
    tmp = Path(tempfile.mkdtemp(prefix="qsd-fuzz-fuse-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tmp)], check=True)
    thread = IOThread.spawn("fuzz-fuse")
    image = tmp / "disk.raw"
    image.write_bytes(bytes(DISK))

    async def setup() -> tuple[AioContext, BlockGraph, BlockBackend]:
        ctx = set_main_context(asyncio.get_running_loop())
        graph = BlockGraph()
        await graph.blockdev_add(qapi.parse_command_args(
            "blockdev-add", {"driver": "file", "node-name": "disk", "filename": str(image)}))
        blk = BlockBackend(graph, graph.nodes["disk"],
                           perm=PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                           shared=PERM_ALL)
        return ctx, graph, blk

    async def teardown(graph: BlockGraph, blk: BlockBackend) -> None:
        await blk.detach()
        await graph.close_all()

    try:
        ctx, graph, blk = thread.ctx.run(setup()).result(30)
        try:
            yield Disk(ctx, blk, image)
        finally:
            thread.ctx.run(teardown(graph, blk)).result(30)
    finally:
        thread.stop()
        subprocess.run(["umount", "-l", str(tmp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- requests --------------------------------------------------------------------------------

OFFSETS = [0, 1, 511, 512, 4095, 4096, DISK - 1, DISK, DISK + 1, 2 * DISK, 2**31, 2**32,
           2**62, 2**63 - 1, 2**63, 2**64 - 1]
SIZES = [0, 1, 512, 4096, 65535, 65536, 65537, MiB, MiB + 1, 2**31 - 1, 2**31, 2**32 - 1]
WRITE_SIZES = [0, 1, 512, 4096, 65535, 65536, 65537]
LIES = [0, 16, 39, 40, 41, 2**32 - 1]
SETATTR_VALID = [P.FATTR_SIZE, P.FATTR_MODE, P.FATTR_UID | P.FATTR_GID,
                 P.FATTR_FH | P.FATTR_LOCKOWNER, P.FATTR_SIZE | P.FATTR_MODE]
FALLOCATE_MODES = [0, P.FALLOC_FL_KEEP_SIZE, P.FALLOC_FL_PUNCH_HOLE | P.FALLOC_FL_KEEP_SIZE,
                   P.FALLOC_FL_PUNCH_HOLE, P.FALLOC_FL_ZERO_RANGE,
                   P.FALLOC_FL_ZERO_RANGE | P.FALLOC_FL_KEEP_SIZE]
INIT_VERSIONS = [(7, 39), (7, 45), (7, 22), (7, 23), (7, 8), (6, 39), (8, 0)]
WHENCES = [P.SEEK_DATA, P.SEEK_HOLE, 0]
# One draw of 96 bytes per request, from which everything is read: hypothesis's time
# goes into draws, not bytes, and bytes shrink towards the simplest requests (zeroes pick
# the first opcode, a truthful length, each table's first value).
SEED_SIZE = 96
SEEDS = st.lists(st.binary(min_size=SEED_SIZE, max_size=SEED_SIZE), min_size=1, max_size=8)


class Seed:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def u32(self, at: int) -> int:
        return int(struct.unpack_from("=I", self.raw, at)[0])

    def u64(self, at: int) -> int:
        return int(struct.unpack_from("=Q", self.raw, at)[0])

    def pick(self, selector: int, table: list[int], raw: int) -> int:
        """A value of the table (at and past the limits), or now and then ``raw``."""
        b = self.raw[selector]
        return table[b % len(table)] if b < 208 else raw


@dataclass(frozen=True)
class Request:
    opcode: int
    body: bytes
    length: int | None          # what the header says, if it lies about it
    header: bytes               # nodeid, uid, gid, pid, total_extlen, padding

    def wire(self, unique: int) -> bytes:
        total = P.IN_HEADER_SIZE + len(self.body)
        return struct.pack("=IIQ", total if self.length is None else self.length,
                           self.opcode, unique) + self.header + self.body


def _body(opcode: int, s: Seed) -> bytes:
    """The opcode's own header with fields at and past their limits (and the data of a
    WRITE); any other opcode gets bytes."""
    fh, lock_owner, flags1, flags2 = s.u64(48), s.u64(56), s.u32(64), s.u32(68)
    offset = s.pick(4, OFFSETS, s.u64(8))
    if opcode == P.READ:
        return P.READ_IN.pack(fh, offset, s.pick(6, SIZES, s.u32(24)), flags1, lock_owner,
                              flags2, 0)
    if opcode == P.WRITE:
        data = bytes([0xA5]) * WRITE_SIZES[s.raw[3] % len(WRITE_SIZES)]
        size = len(data) if s.raw[6] < 128 else s.pick(7, SIZES, s.u32(24))
        return P.WRITE_IN.pack(fh, offset, size, flags1, lock_owner, flags2, 0) + data
    if opcode == P.INIT:
        major, minor = INIT_VERSIONS[s.raw[6] % len(INIT_VERSIONS)] if s.raw[6] < 208 \
            else (s.u32(24), s.u32(28))
        return P.INIT_IN_COMPAT.pack(major, minor, flags1, flags2) + s.raw[72:72 + s.raw[3] % 9]
    if opcode == P.SETATTR:
        valid = s.pick(6, SETATTR_VALID, s.u32(24))
        size = s.u32(28) % (4 * MiB) if s.raw[5] < 128 else s.pick(5, OFFSETS, s.u64(16))
        return P.SETATTR_IN.pack(valid, 0, fh, size, lock_owner, 0, 0, 0, 0, 0, 0, flags1, 0,
                                 flags2, flags1 ^ flags2, 0)
    if opcode == P.FALLOCATE:
        return P.FALLOCATE_IN.pack(fh, offset, s.pick(5, OFFSETS, s.u64(16)),
                                   s.pick(6, FALLOCATE_MODES, s.u32(24)), 0)
    if opcode == P.LSEEK:
        return P.LSEEK_IN.pack(fh, offset, s.pick(6, WHENCES, s.u32(24)), 0)
    return s.raw[48:48 + s.raw[3] % 49]


def _request(s: Seed) -> Request:
    opcode = s.pick(0, OPCODES, s.u32(40))
    length = None if s.raw[1] < 192 else LIES[s.raw[1] % len(LIES)]
    body = s.raw[48:48 + s.raw[3] % 49] if s.raw[2] >= 208 else _body(opcode, s)
    return Request(opcode, body, length, s.raw[72:96])


def requests(seeds: list[bytes]) -> list[Request]:
    return [_request(Seed(seed)) for seed in seeds]


# ---- one queue per example -------------------------------------------------------------------


class Served:
    """A FuseQueue on one end of a socketpair, the test on the other."""

    def __init__(self, disk: Disk, writable: bool, growable: bool) -> None:
        self.disk = disk
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.theirs.setblocking(False)
        # A READ answer is up to 1 MiB in one message, as /dev/fuse takes it.
        self.theirs.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 * MiB)
        self.ours.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * MiB)
        self.ours.settimeout(30)
        self.halted = threading.Event()
        self.file = FuseFile(disk.blk, writable=writable, growable=growable,
                             allow_other=False)
        self.queue = FuseQueue(self.file, disk.ctx, self.theirs.fileno(), self._halt,
                               lambda: None, group=None)
        disk.ctx.call_soon(self.queue.attach)

    def _halt(self) -> None:
        """What the export does (FuseExport._halt)."""
        self.file.halted = True
        self.queue.pause()
        self.halted.set()

    def reply(self) -> tuple[int, int, bytes]:
        data = self.ours.recv(BUFFER_SIZE + MiB)
        length, error, unique = P.OUT_HEADER.unpack_from(data, 0)
        assert length == len(data), (length, len(data))
        assert -4095 <= error <= 0, error
        if error:
            assert length == P.OUT_HEADER_SIZE
        return unique, error, data[P.OUT_HEADER_SIZE:]

    def close(self) -> None:
        async def stop() -> None:
            await self.queue.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.disk.ctx.loop).result(30)
        assert self.queue.in_flight == 0 and not self.queue.tasks
        self.queue.close()
        self.ours.close()
        self.theirs.close()


def _reset(disk: Disk) -> None:
    """Each example starts from the same 1 MiB of zeroes and ones."""
    async def reset() -> None:
        await disk.blk.truncate(DISK, exact=True)
    asyncio.run_coroutine_threadsafe(reset(), disk.ctx.loop).result(30)
    with open(disk.image, "r+b") as f:
        f.write(bytes(DISK // 2) + b"\x01" * (DISK // 2))


def _image(disk: Disk) -> bytes:
    return disk.image.read_bytes()


def _check(served: Served, req: Request, error: int, payload: bytes) -> None:
    """What the answer to a well-formed request says about the image."""
    if error:
        return
    disk = served.disk
    # The block layer's length is in whole sectors (QEMU's bdrv_getlength), the bytes
    # past the file's end within the last one read as zeroes.
    size = -(-disk.image.stat().st_size // 512) * 512
    if req.opcode == P.READ and len(req.body) >= P.READ_IN.size:
        _, offset, length, *_ = P.READ_IN.unpack_from(req.body)
        expected = max(0, min(length, size - offset))
        assert len(payload) == expected, (offset, length, size)
        if not expected:
            return
        with open(disk.image, "rb") as f:
            assert payload == os.pread(f.fileno(), expected, offset).ljust(expected, b"\0")
    elif req.opcode == P.WRITE and len(req.body) >= P.WRITE_IN.size:
        _, offset, length, *_ = P.WRITE_IN.unpack_from(req.body)
        written, _ = P.WRITE_OUT.unpack(payload)
        assert written <= length
        data = req.body[P.WRITE_IN.size:P.WRITE_IN.size + written]
        if not written:
            return
        with open(disk.image, "rb") as f:
            assert os.pread(f.fileno(), written, offset) == data
    elif req.opcode == P.GETATTR:
        assert P.ATTR_OUT.unpack(payload)[4] == size


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(reqs=SEEDS.map(requests), writable=st.booleans(), growable=st.booleans())
def test_fuse_decoder(disk: Disk, reqs: list[Request], writable: bool,
                      growable: bool) -> None:
    _reset(disk)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        served = Served(disk, writable, growable)
        try:
            for unique, req in enumerate(reqs, start=1):
                wire = req.wire(unique)
                served.ours.send(wire)
                if len(wire) < P.IN_HEADER_SIZE or len(wire) > BUFFER_SIZE or \
                        P.IN_HEADER_HEAD.unpack_from(wire)[0] != len(wire):
                    assert served.halted.wait(30), "a request that lies about its length"
                    assert "halting the export" in stderr.getvalue()
                    return
                if req.opcode in NO_REPLY:
                    continue
                got, error, payload = served.reply()
                assert got == unique, (got, unique)
                _check(served, req, error, payload)
            # Nothing else was answered (a FORGET, say): the next answer is the marker's.
            served.ours.send(P.IN_HEADER.pack(P.IN_HEADER_SIZE, P.GETATTR, 2**64 - 1,
                                              1, 0, 0, 0, 0, 0))
            assert served.reply()[0] == 2**64 - 1
        finally:
            served.close()
    assert "failed:" not in stderr.getvalue(), stderr.getvalue()


def test_fuse_decoder_halts_on_a_short_read(disk: Disk) -> None:
    """A read shorter than a request header halts the queue with QEMU's message."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        served = Served(disk, True, False)
        try:
            served.ours.send(struct.pack("=IIQ", 16, P.GETATTR, 1))
            assert served.halted.wait(30)
        finally:
            served.close()
    assert stderr.getvalue().endswith(
        ": Incomplete read from FUSE device, expected at least 40 bytes, read 16 bytes; "
        "cannot trust subsequent requests, halting the export\n")

