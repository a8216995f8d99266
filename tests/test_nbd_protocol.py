"""The NBD server's protocol, in-process against an in-memory backend.

The server runs in its own thread and loop; clients are libnbd, qemu-nbd/qemu-io/nbdinfo
and a raw socket client for what libnbd 1.14 cannot do (extended headers, malformed
input). test_nbd_daemon.py repeats the important cases against the real daemon.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nbd
import pytest
import uvloop

from qsd import qapi
from qsd.aio import AioContext
from qsd.block.node import BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_ZERO
from qsd.export.nbd import NbdExport
from qsd.nbd import protocol as P
from qsd.nbd.server import NbdServer
from tests.harness import nbd_flags, nbd_list

CLUSTER = 65536


class MemBackend:
    """BlockBackend's interface over a sparse in-memory disk (64 KiB allocation units)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.allocated: set[int] = set()
        self.dev_ops: tuple[Any, ...] = ()
        self.aio_notifiers: list[Any] = []
        self.fail_reads = False
        self.flushes = 0
        self.perm, self.shared = 1, 15
        self.request_queuing = True

    def length(self) -> int:
        return len(self.data)

    def set_perm(self, perm: int, shared: int) -> None:
        self.perm, self.shared = perm, shared

    def set_dev_ops(self, begin: Any, end: Any, poll: Any) -> None:
        self.dev_ops = (begin, end, poll)

    def disable_request_queuing(self) -> None:
        self.request_queuing = False

    def add_aio_context_notifier(self, notifier: Any) -> None:
        self.aio_notifiers.append(notifier)

    def _mark(self, offset: int, length: int) -> None:
        for c in range(offset // CLUSTER, (offset + length + CLUSTER - 1) // CLUSTER):
            self.allocated.add(c)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        return None

    def write_nowait(self, offset: int, data: bytes, fua: bool = False) -> bool:
        return False

    async def read(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0)
        if self.fail_reads:
            raise OSError(errno.EIO, "injected")
        return bytes(self.data[offset:offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.data[offset:offset + len(data)] = data
        self._mark(offset, len(data))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           no_fallback: bool = False, fua: bool = False) -> None:
        if no_fallback and not may_unmap:
            raise OSError(errno.ENOTSUP, "no fast zero")
        self.data[offset:offset + length] = bytes(length)
        if not may_unmap:
            self._mark(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        first = (offset + CLUSTER - 1) // CLUSTER
        for c in range(first, (offset + length) // CLUSTER):
            self.allocated.discard(c)
            self.data[c * CLUSTER:(c + 1) * CLUSTER] = bytes(CLUSTER)

    async def flush(self) -> None:
        self.flushes += 1

    async def block_status(self, offset: int, length: int) -> tuple[int, int]:
        c = offset // CLUSTER
        alloc = c in self.allocated
        end = offset
        while end < offset + length and ((end // CLUSTER) in self.allocated) == alloc:
            end = (end // CLUSTER + 1) * CLUSTER
        end = min(end, offset + length)
        flags = (BLOCK_DATA | BLOCK_ALLOCATED) if alloc else BLOCK_ZERO
        return flags, end - offset

    async def block_status_depth(self, offset: int, length: int) -> tuple[int, int, int]:
        flags, count = await self.block_status(offset, length)
        return flags, count, 1 if flags & BLOCK_ALLOCATED else 0


class Harness:
    """A server thread with its own loop, standing in for the daemon's main context."""

    def __init__(self, path: str, max_connections: int = 100) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ctx = AioContext("main", self.loop, self.thread)
        self.path = path
        self.daemon = SimpleNamespace(nbd_server=None, iothreads={})
        self.daemon.nbd_server = self.run(self._server(max_connections))
        self.exports: list[NbdExport] = []

    async def _server(self, max_connections: int) -> NbdServer:
        addr = qapi.parse_type("SocketAddress", {"type": "unix", "path": self.path})
        return NbdServer(addr, max_connections, 10)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def add(self, node: str, backend: MemBackend, **kw: Any) -> NbdExport:
        opts = SimpleNamespace(id=kw.pop("id", node), node_name=node, name=None,
                               description=None, writable=False, bitmaps=None,
                               allocation_depth=False)
        for key, value in kw.items():
            setattr(opts, key, value)
        exp = self.run(NbdExport.create(self.daemon, opts, backend, [self.ctx]))
        self.exports.append(exp)
        assert isinstance(exp, NbdExport)
        return exp

    def close(self) -> None:
        for exp in self.exports:
            self.run(exp.shutdown())
        self.run(self.daemon.nbd_server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def workdir() -> Iterator[str]:
    """A private directory: concurrent pytest runs may rotate each other's tmp_path."""
    path = tempfile.mkdtemp(prefix="qsd-nbd-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def harness(workdir: str) -> Iterator[Harness]:
    h = Harness(os.path.join(workdir, "nbd.sock"))
    try:
        yield h
    finally:
        h.close()


def uri(h: Harness, name: str) -> str:
    return f"nbd+unix:///{name}?socket={h.path}"


def connect(h: Harness, name: str, structured: bool = True) -> nbd.NBD:
    client = nbd.NBD()
    client.set_request_structured_replies(structured)
    client.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    client.connect_uri(uri(h, name))
    return client


def test_flags_and_list(harness: Harness) -> None:
    harness.add("ro", MemBackend(1 << 20))
    harness.add("rw", MemBackend(1 << 20), writable=True, description="hello")
    out = nbd_list(harness.path)
    assert nbd_flags(out, 0x58f, "readonly flush fua df multi cache") in out
    assert nbd_flags(out, 0xded, "flush fua trim zeroes df multi cache fast-zero") in out
    assert "description: hello" in out
    assert "base:allocation" in out


def test_structured_and_simple_io(harness: Harness) -> None:
    backend = MemBackend(4 << 20)
    harness.add("d", backend, writable=True)
    for structured in (True, False):
        c = connect(harness, "d", structured)
        assert c.get_structured_replies_negotiated() == structured
        c.pwrite(b"x" * 4096, CLUSTER)
        c.pwrite(b"y" * 100, 3 * CLUSTER + 5, nbd.CMD_FLAG_FUA)
        assert c.pread(4096, CLUSTER) == b"x" * 4096
        assert c.pread(8192, 0) == bytes(8192)
        # A read across hole and data comes back right from hole+data chunks.
        assert c.pread(2 * CLUSTER, 0)[CLUSTER:CLUSTER + 4096] == b"x" * 4096
        c.flush()
        c.zero(4096, CLUSTER)
        assert c.pread(4096, CLUSTER) == bytes(4096)
        c.trim(CLUSTER, 3 * CLUSTER)
        c.cache(4096, 0)
        c.shutdown()
    assert backend.flushes >= 2


def test_block_status(harness: Harness) -> None:
    backend = MemBackend(1 << 20)
    backend.allocated = {1, 2, 5}
    harness.add("d", backend)
    c = connect(harness, "d")
    seen: list[int] = []

    def extent(metacontext: str, offset: int, entries: list[int], err: int) -> int:
        assert metacontext == "base:allocation"
        seen.extend(entries)
        return 0

    c.block_status(1 << 20, 0, extent)
    assert seen == [CLUSTER, 3, 2 * CLUSTER, 0, 2 * CLUSTER, 3, CLUSTER, 0,
                    10 * CLUSTER, 3]
    seen.clear()
    c.block_status(1 << 20, 0, extent, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [CLUSTER, 3]
    c.shutdown()


def test_errors_and_bounds(harness: Harness) -> None:
    backend = MemBackend(1 << 20)
    harness.add("d", backend)
    c = connect(harness, "d")
    c.set_strict_mode(0)
    with pytest.raises(nbd.Error) as info:
        c.pread(4096, (1 << 20) - 100)
    assert info.value.errno == "EINVAL"
    with pytest.raises(nbd.Error) as info:
        c.pwrite(b"a", 0)
    assert info.value.errno == "EINVAL"  # QEMU answers every bad request with EINVAL
    backend.allocated = {0}
    backend.fail_reads = True
    with pytest.raises(nbd.Error) as info:
        c.pread(512, 0, nbd.CMD_FLAG_DF)
    assert info.value.errno == "EIO"
    backend.fail_reads = False
    assert c.pread(512, 0) == bytes(512)
    c.shutdown()


def test_qemu_tools(harness: Harness, workdir: str) -> None:
    backend = MemBackend(2 << 20)
    harness.add("d", backend, writable=True)
    target = uri(harness, "d")
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4k 64k",
                          "-c", "read -P 0xab 4k 64k", "-c", "read -P 0 1M 4k", target],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out
    copy = Path(workdir) / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", target, str(copy)],
                   check=True, timeout=20)
    assert copy.read_bytes() == bytes(backend.data)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", target, str(copy)],
                   check=True, timeout=20, capture_output=True)
    info = subprocess.run(["qemu-img", "info", "-f", "raw", target], check=True,
                          timeout=20, capture_output=True, text=True).stdout
    assert "virtual size: 2 MiB" in info
    nmap = subprocess.run(["nbdinfo", "--map", target], check=True, timeout=20,
                          capture_output=True, text=True).stdout.split("\n")
    assert nmap[0].split() == ["0", "131072", "0", "data"]
    assert nmap[1].split() == ["131072", "1966080", "3", "hole,zero"]


def test_max_connections(workdir: str) -> None:
    h = Harness(os.path.join(workdir, "nbd.sock"), max_connections=1)
    try:
        h.add("d", MemBackend(1 << 20))
        first = connect(h, "d")
        assert not first.can_multi_conn()
        second = nbd.NBD()
        done = threading.Event()

        def late() -> None:
            second.connect_uri(uri(h, "d"))
            done.set()

        threading.Thread(target=late, daemon=True).start()
        assert not done.wait(0.5)  # queued in the backlog, not served
        first.shutdown()
        assert done.wait(10)
        second.shutdown()
    finally:
        h.close()


def attached(exp: NbdExport) -> bool:
    """The test thread can overtake the server thread between GO's reply and attach."""
    deadline = time.monotonic() + 5
    while not exp.served.clients():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_drain_stops_reading(harness: Harness) -> None:
    backend = MemBackend(1 << 20)
    exp = harness.add("d", backend, writable=True)
    c = connect(harness, "d")
    assert attached(exp)
    begin, end, poll = backend.dev_ops
    begin()
    assert not poll()
    cookie = c.aio_pwrite(b"z" * 512, 0)
    time.sleep(0.3)
    c.poll(0)
    assert not c.aio_command_completed(cookie)
    end()
    while not c.aio_command_completed(cookie):
        c.poll(-1)
    assert backend.data[:512] == b"z" * 512
    c.shutdown()


def test_hard_shutdown_drops_clients(harness: Harness) -> None:
    exp = harness.add("d", MemBackend(1 << 20))
    c = connect(harness, "d")
    assert attached(exp) and exp.in_use()
    harness.run(exp.shutdown())
    with pytest.raises(nbd.Error):
        c.pread(512, 0)
    assert not exp.in_use()


# -- raw client ----------------------------------------------------------------------


class Raw:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        greeting = self.recv(18)
        assert greeting[:16] == struct.pack(">QQ", P.NBD_INIT_MAGIC, P.NBD_OPTS_MAGIC)
        self.sock.sendall(struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE
                                      | P.NBD_FLAG_C_NO_ZEROES))

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def option(self, opt: int, payload: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(struct.pack(">QII", P.NBD_OPTS_MAGIC, opt, len(payload)) + payload)
        replies = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == P.NBD_REP_MAGIC and ropt == opt
            replies.append((rtype, self.recv(length)))
            if rtype == P.NBD_REP_ACK or rtype & P.NBD_REP_ERR:
                return replies

    def go(self, name: str) -> int:
        replies = self.option(P.NBD_OPT_GO, struct.pack(">I", len(name)) + name.encode()
                              + struct.pack(">H", 0))
        assert replies[-1][0] == P.NBD_REP_ACK, replies
        for rtype, data in replies:
            if rtype == P.NBD_REP_INFO and data[:2] == b"\0\0":
                return int(struct.unpack(">H", data[10:12])[0])
        raise AssertionError("no NBD_INFO_EXPORT")

    def ext_request(self, cmd: int, offset: int, length: int, flags: int = 0,
                    cookie: int = 7, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">IHHQQQ", P.NBD_EXTENDED_REQUEST_MAGIC, flags, cmd,
                                      cookie, offset, length) + payload)

    def ext_chunk(self) -> tuple[int, int, int, int, bytes]:
        magic, flags, ctype, cookie, offset, length = struct.unpack(">IHHQQQ", self.recv(32))
        assert magic == P.NBD_EXTENDED_REPLY_MAGIC
        return flags, ctype, cookie, offset, self.recv(length)


def meta_payload(name: str, *queries: str) -> bytes:
    out = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def test_extended_headers(harness: Harness) -> None:
    backend = MemBackend(1 << 20)
    backend.allocated = {0}
    backend.data[:4] = b"abcd"
    harness.add("d", backend, writable=True, allocation_depth=True)
    r = Raw(harness.path)
    listed = r.option(P.NBD_OPT_LIST_META_CONTEXT, meta_payload("d"))
    assert [d[4:] for t, d in listed if t == P.NBD_REP_META_CONTEXT] == [
        b"base:allocation", b"qemu:allocation-depth"]
    assert r.option(P.NBD_OPT_EXTENDED_HEADERS)[-1][0] == P.NBD_REP_ACK
    assert r.option(P.NBD_OPT_STRUCTURED_REPLY)[-1][0] == P.NBD_REP_ERR_EXT_HEADER_REQD
    replies = r.option(P.NBD_OPT_SET_META_CONTEXT,
                       meta_payload("d", "base:allocation", "qemu:allocation-depth"))
    assert [(t, d) for t, d in replies if t == P.NBD_REP_META_CONTEXT] == [
        (P.NBD_REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
        (P.NBD_REP_META_CONTEXT, b"\0\0\0\1qemu:allocation-depth")]
    assert r.go("d") == 0x1ded
    # Read: data chunk then a hole chunk.
    r.ext_request(P.NBD_CMD_READ, 0, 2 * CLUSTER)
    flags, ctype, cookie, offset, body = r.ext_chunk()
    assert (flags, ctype, cookie, offset) == (0, P.NBD_REPLY_TYPE_OFFSET_DATA, 7, 0)
    assert body[8:12] == b"abcd" and len(body) == 8 + CLUSTER
    flags, ctype, _, _, body = r.ext_chunk()
    assert (flags, ctype) == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_HOLE)
    assert struct.unpack(">QI", body) == (CLUSTER, CLUSTER)
    # Block status with a payload selecting only allocation-depth (64-bit extents).
    r.ext_request(P.NBD_CMD_BLOCK_STATUS, 0, 12, P.NBD_CMD_FLAG_PAYLOAD_LEN,
                  payload=struct.pack(">QI", 1 << 20, 1))
    flags, ctype, _, _, body = r.ext_chunk()
    assert (flags, ctype) == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS_EXT)
    assert struct.unpack(">IIQQQQ", body) == (1, 2, CLUSTER, 1, 15 * CLUSTER, 0)
    # Write with payload flag, then a generic success is a NONE chunk.
    r.ext_request(P.NBD_CMD_WRITE, 8, 3, P.NBD_CMD_FLAG_PAYLOAD_LEN, payload=b"xyz")
    assert r.ext_chunk()[:2] == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE)
    assert backend.data[8:11] == b"xyz"
    # Past EOF: an error chunk with QEMU's message.
    r.ext_request(P.NBD_CMD_READ, 1 << 20, 1)
    flags, ctype, _, _, body = r.ext_chunk()
    assert ctype == P.NBD_REPLY_TYPE_ERROR
    assert struct.unpack(">IH", body[:6])[0] == P.NBD_EINVAL
    assert body[6:].startswith(b"operation past EOF")
    r.ext_request(P.NBD_CMD_DISC, 0, 0)
    assert r.sock.recv(1) == b""


def test_handshake_errors(harness: Harness) -> None:
    harness.add("d", MemBackend(1 << 20))
    r = Raw(harness.path)
    rtype, msg = r.option(P.NBD_OPT_GO, struct.pack(">I", 1) + b"x" + b"\0\0")[-1]
    assert rtype == P.NBD_REP_ERR_UNKNOWN and msg == b"export 'x' not present"
    rtype, msg = r.option(99, b"abc")[-1]
    assert rtype == P.NBD_REP_ERR_UNSUP and msg == b"Unsupported option 99 (<unknown>)"
    rtype, msg = r.option(P.NBD_OPT_LIST, b"a")[-1]
    assert rtype == P.NBD_REP_ERR_INVALID and msg == b"option 'list' has unexpected length"
    rtype, msg = r.option(P.NBD_OPT_GO, struct.pack(">I", 50) + b"x")[-1]
    assert rtype == P.NBD_REP_ERR_INVALID and msg == b"Inconsistent lengths in option go"
    rtype, msg = r.option(P.NBD_OPT_SET_META_CONTEXT, meta_payload("d"))[-1]
    assert rtype == P.NBD_REP_ERR_INVALID
    assert msg == b"request option 'set meta context' when structured reply is not negotiated"
    assert r.option(P.NBD_OPT_ABORT)[-1][0] == P.NBD_REP_ACK


def serve_still_works(h: Harness) -> None:
    c = connect(h, "d")
    assert c.pread(16, 0) == bytes(16)
    c.shutdown()


def test_bad_magic_disconnects(harness: Harness) -> None:
    harness.add("d", MemBackend(1 << 20))
    r = Raw(harness.path)
    r.go("d")
    r.sock.sendall(b"\xff" * 28)
    assert r.sock.recv(1) == b""
    serve_still_works(harness)


def test_oversized_option_disconnects(harness: Harness) -> None:
    harness.add("d", MemBackend(1 << 20))
    r = Raw(harness.path)
    r.sock.sendall(struct.pack(">QII", P.NBD_OPTS_MAGIC, P.NBD_OPT_GO, 64 << 20))
    assert r.sock.recv(1) == b""
    serve_still_works(harness)


def test_listener_socket_removed_on_stop(workdir: str) -> None:
    h = Harness(os.path.join(workdir, "nbd.sock"))
    assert os.path.exists(h.path)
    h.close()
    assert not os.path.exists(h.path)
