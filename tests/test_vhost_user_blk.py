"""vhost-user-blk exports of a real qsd, driven by the Python front-end in vhost_user.py.

The expected texts, feature bits and configuration bytes were recorded from QEMU 11.1.3's
daemon; where qsd goes further (packed rings, inflight tracking, several iothreads,
checks QEMU lacks) the test says so.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import Monitor
from tests.vhost_user import (
    ADD_MEM_REG,
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    GET_CONFIG,
    GET_FEATURES,
    GET_INFLIGHT_FD,
    GET_MAX_MEM_SLOTS,
    GET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM,
    GET_STATUS,
    GET_VRING_BASE,
    REM_MEM_REG,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SET_CONFIG,
    SET_FEATURES,
    SET_INFLIGHT_FD,
    SET_MEM_TABLE,
    SET_STATUS,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    SET_VRING_CALL,
    SET_VRING_ENABLE,
    SET_VRING_KICK,
    SET_VRING_NUM,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    Frontend,
    Memory,
    Request,
    SplitDriver,
)

MiB = 1024 * 1024
# QEMU 11.1.3's feature bits for a writable export, without VHOST_F_LOG_ALL (no dirty
# logging in qsd) and with VIRTIO_F_RING_PACKED (which QEMU's back-end lacks).
FEATURES = 0x175007E44 & ~(1 << 26) | 1 << 34
FEATURE_RO = 1 << 5
# MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD, RESET_DEVICE, CONFIGURE_MEM_SLOTS, STATUS.
PROTOCOL_FEATURES = 0x1B209


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Images and sockets in a short private path (unix socket paths are limited)."""
    path = Path(tempfile.mkdtemp(prefix="qsd-vu-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def export_args(workdir: Path, *, size: int = 64 * MiB, extra: str = "",
                node: str = "") -> list[str]:
    img = workdir / "disk.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.truncate(size)
    return ["--blockdev", f"file,node-name=disk,filename={img}{node}",
            "--export", f"vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                        f"addr.path={workdir}/vu.sock{extra}"]


def qsd_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def guest_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum("memfd:guest-ram" in line for line in maps)


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---- block-export-add -------------------------------------------------------------------

def test_export_errors_and_lifecycle(workdir: Path, start_qsd: QsdFactory) -> None:
    img = workdir / "disk.img"
    img.write_bytes(bytes(MiB))
    daemon = start_qsd("--blockdev", f"file,node-name=disk,filename={img}",
                       "--blockdev", f"file,node-name=ro,filename={img},read-only=on",
                       "--object", "iothread,id=io0", "--object", "iothread,id=io1")
    mon = Monitor(daemon)
    sock = str(workdir / "vu.sock")

    def err(**args: object) -> str:
        full = {"type": "vhost-user-blk", "id": "e0", "node-name": "disk",
                "addr": {"type": "unix", "path": sock}, **args}
        return mon.err("block-export-add", **full)

    assert mon.err("block-export-add", type="vhost-user-blk", id="e0",
                   **{"node-name": "disk"}) == "Parameter 'addr' is missing"
    only = "Only socket address types 'unix' and 'fd' are supported"
    assert err(addr={"type": "inet", "host": "127.0.0.1", "port": "0"}) == only
    assert err(addr={"type": "vsock", "cid": "1", "port": "1"}) == only
    assert err(addr={"type": "unix", "path": "/nonexistent/x.sock"}) == (
        "Failed to bind socket to /nonexistent/x.sock: No such file or directory")
    assert err(addr={"type": "unix", "path": str(workdir)}) == (
        f"Failed to unlink socket {workdir}: Is a directory")
    block_size = "parameter logical-block-size must be a power of 2 between 512 and 2097152"
    for value in (1000, 256, 4 * MiB, -1):
        assert err(**{"logical-block-size": value}) == block_size
    assert err(**{"logical-block-size": "4k"}) == (
        "Parameter 'logical-block-size' expects uint64")
    assert err(**{"num-queues": 0}) == "num-queues must be greater than 0"
    for value in (65536, -1):
        assert err(**{"num-queues": value}) == "Parameter 'num-queues' expects uint16_t"
    # QEMU's order: the block size first, then the queues, then the address.
    assert err(**{"num-queues": 0, "logical-block-size": 3}) == block_size
    assert err(**{"num-queues": 0, "addr": {"type": "inet", "host": "x", "port": "1"}}) == (
        "num-queues must be greater than 0")
    assert err(iothread=[]) == "The set of I/O threads must not be empty"
    assert err(iothread="nope") == 'iothread "nope" not found'
    assert err(**{"node-name": "ro", "writable": True}) == (
        "Cannot export read-only node as writable")
    assert err(**{"fixed-iothread": True, "iothread": ["io0", "io1"]}) == (
        "Cannot use fixed-iothread for a multi-threaded export")
    assert err(extra=1) == "Parameter 'extra' is unexpected"
    assert not os.path.exists(sock)

    # QEMU 11.1.3 refuses a list of iothreads ("vhost-user-blk export does not support
    # multi-threading"); qsd spreads the queues over them.
    mon.ok("block-export-add", type="vhost-user-blk", id="e0", **{"node-name": "disk"},
           addr={"type": "unix", "path": sock}, iothread=["io0", "io1"],
           **{"num-queues": 1025})
    assert mon.ok("query-block-exports") == [
        {"type": "vhost-user-blk", "id": "e0", "node-name": "disk", "shutting-down": False}]
    assert err() == "Block export id 'e0' is already in use"
    assert mon.err("object-del", id="io1") == "object 'io1' is in use, can not be deleted"
    # Like QEMU, a second export may take over the socket path: the old socket is
    # unlinked first.
    mon.ok("block-export-add", type="vhost-user-blk", id="e1", **{"node-name": "ro"},
           addr={"type": "unix", "path": sock})
    fe = Frontend(sock)
    assert fe.u64(GET_FEATURES) == FEATURES | FEATURE_RO
    fe.close()
    # 11.1.3 finishes deleting this type inside the command: the event comes first.
    mon.ok("block-export-del", id="e0")
    assert [(e["event"], e["data"]) for e in mon.events] == [
        ("BLOCK_EXPORT_DELETED", {"id": "e0"})]
    mon.events.clear()
    mon.ok("object-del", id="io1")
    mon.ok("block-export-del", id="e1", mode="hard")
    assert [(e["event"], e["data"]) for e in mon.events] == [
        ("BLOCK_EXPORT_DELETED", {"id": "e1"})]
    assert not os.path.exists(sock)


# ---- the device ------------------------------------------------------------------------

def test_features_config_and_status(workdir: Path, start_qsd: QsdFactory) -> None:
    daemon = start_qsd(*export_args(workdir, extra=",writable=on,num-queues=4"))
    fe = Frontend(str(workdir / "vu.sock"))
    assert fe.u64(GET_FEATURES) == FEATURES
    assert fe.u64(GET_PROTOCOL_FEATURES) == PROTOCOL_FEATURES
    assert fe.u64(GET_QUEUE_NUM) == 4
    assert fe.u64(GET_MAX_MEM_SLOTS) == 509
    # QEMU 11.1.3's virtio-blk configuration space for a 64 MiB disk and 4 queues.
    config = fe.call(GET_CONFIG, struct.pack("=III", 0, 96, 0) + bytes(96))
    assert config[:12] == struct.pack("=III", 0, 96, 0)
    assert config[12:].hex() == (
        "0000020000000000000000007e00000000000000000200000000000000000000"
        "0000040000800000010000000100000000800000010000000000000000000000"
        + "00" * 32)
    # Part of it, and what the front-end may not have.
    assert fe.call(GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(8))[12:] == (
        struct.pack("<Q", 64 * MiB // 512))
    assert fe.call(GET_CONFIG, struct.pack("=III", 0, 97, 0) + bytes(97)) == b""
    # The guest turns the write cache on: the config space shows it.
    fe.send(SET_CONFIG, struct.pack("=III", 32, 1, 0) + b"\1")
    assert fe.call(GET_CONFIG, struct.pack("=III", 32, 1, 0) + b"\0")[12:] == b"\1"
    fe.send(SET_STATUS, struct.pack("=Q", 0xF))
    assert fe.u64(GET_STATUS) == 0xF
    # REPLY_ACK: a request flagged NEED_REPLY is acknowledged with 0.
    fe.send(SET_VRING_ENABLE, struct.pack("=II", 0, 1), flags=1 | 8)
    assert fe.recv()[:3] == (SET_VRING_ENABLE, 5, struct.pack("=Q", 0))
    fe.close()
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx,indirect", [(True, True), (False, False)],
                         ids=["event_idx+indirect", "plain"])
def test_requests(workdir: Path, start_qsd: QsdFactory, packed: bool, event_idx: bool,
                  indirect: bool) -> None:
    daemon = start_qsd(*export_args(workdir, extra=",writable=on,num-queues=2",
                                    node=",discard=unmap"))
    img = workdir / "disk.img"
    fe = Frontend(str(workdir / "vu.sock"))
    fe.setup(2, packed=packed, event_idx=event_idx, indirect=indirect)
    data = os.urandom(64 * 1024)
    assert fe.write(0, 2048, data) == S_OK
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(data)) == data
    assert fe.read(1, 2048, len(data)) == (S_OK, data)
    assert fe.read(0, 2049, 512) == (S_OK, data[512:1024])
    get_id = fe.io(0, Request(T_GET_ID, 0, read_len=20))
    assert fe.status(get_id) == S_OK
    assert fe.data(get_id) == b"vhost_user_blk\0" + b"\xee" * 5
    assert fe.status(fe.io(0, Request(T_FLUSH, 0))) == S_OK
    # Write zeroes (and may unmap) and discard, then read zeroes back.
    assert fe.discard_or_zeroes(0, T_WRITE_ZEROES, 2048, 32, 1) == S_OK
    assert fe.read(0, 2048, 16384) == (S_OK, bytes(16384))
    assert fe.discard_or_zeroes(1, T_DISCARD, 2080, 64) == S_OK
    assert fe.read(1, 2080, 32768) == (S_OK, bytes(32768))
    assert os.stat(img).st_blocks * 512 < 64 * 1024
    # QEMU's request checks: range, alignment, unknown types and flags.
    capacity = 64 * MiB // 512
    assert fe.read(0, capacity, 512)[0] == S_IOERR
    assert fe.read(0, capacity - 1, 1024)[0] == S_IOERR
    assert fe.write(0, 0, b"x" * 100) == S_IOERR
    assert fe.status(fe.io(0, Request(99, 0, read_len=512))) == S_UNSUPP
    assert fe.discard_or_zeroes(0, T_DISCARD, 0, 8, 1) == S_UNSUPP
    assert fe.discard_or_zeroes(0, T_WRITE_ZEROES, 0, 8, 2) == S_UNSUPP
    assert fe.discard_or_zeroes(0, T_DISCARD, 0, 32769) == S_IOERR
    # Many requests in flight at once on both queues (three descriptors each when not
    # indirect: 40 fill most of a 128-entry ring).
    reqs = []
    for i in range(80):
        reqs.append(Request(T_OUT, 4096 + 8 * i, data=bytes([i]) * 4096))
        assert fe.submit(i % 2, reqs[-1]) is not None
    fe.wait(0, 40)
    fe.wait(1, 40)
    assert all(fe.status(r) == S_OK for r in reqs)
    for i in range(0, 80, 7):
        assert fe.read(i % 2, 4096 + 8 * i, 4096) == (S_OK, bytes([i]) * 4096)
    assert [fe.stop_queue(0), fe.stop_queue(1)] == [fe.queues[0].base(), fe.queues[1].base()]
    fe.close()
    assert daemon.proc.poll() is None


def test_read_only_export(workdir: Path, start_qsd: QsdFactory) -> None:
    start_qsd(*export_args(workdir))
    fe = Frontend(str(workdir / "vu.sock"))
    fe.setup()
    assert fe.write(0, 0, bytes(512)) == S_IOERR
    assert fe.discard_or_zeroes(0, T_WRITE_ZEROES, 0, 1) == S_IOERR
    assert fe.read(0, 0, 512) == (S_OK, bytes(512))
    fe.close()


@pytest.mark.parametrize(("value", "blk_size"), [(4096, 4096), (0, 512)])
def test_logical_block_size(workdir: Path, start_qsd: QsdFactory, value: int,
                            blk_size: int) -> None:
    """0 passes QEMU's check ("unset"); 11.1.3 then offers a block size of 0 and dies of
    SIGFPE at the first request, qsd takes the default."""
    start_qsd(*export_args(workdir, extra=f",writable=on,logical-block-size={value}"))
    fe = Frontend(str(workdir / "vu.sock"))
    config = fe.call(GET_CONFIG, struct.pack("=III", 0, 96, 0) + bytes(96))[12:]
    assert struct.unpack_from("<I", config, 20)[0] == blk_size
    sectors = blk_size // 512
    assert struct.unpack_from("<I", config, 44)[0] == sectors    # discard alignment
    fe.setup()
    assert fe.write(0, sectors, bytes(blk_size)) == S_OK
    assert fe.write(0, 1, bytes(blk_size)) == (S_IOERR if sectors > 1 else S_OK)
    fe.close()


# ---- never trust the front-end ------------------------------------------------------------

def _region(mem: Memory, gpa_off: int = 0) -> bytes:
    return struct.pack("=QQQQ", mem.regions()[0][0] + gpa_off, mem.size, mem.regions()[0][2], 0)


def _bad_ring(layout: Callable[[Frontend, SplitDriver], None]) -> Callable[[Frontend], None]:
    """A running queue whose driver then lays out something broken and kicks."""
    def run(fe: Frontend) -> None:
        fe.setup()
        driver = fe.queues[0]
        assert isinstance(driver, SplitDriver)
        layout(fe, driver)
        fe.kick(0)
    return run


def _avail(fe: Frontend, driver: SplitDriver, head: int, idx: int | None = None) -> None:
    mem = fe.mem
    assert mem is not None
    mem.write(driver.avail + 4, struct.pack("<H", head))
    mem.write(driver.avail + 2, struct.pack("<H", 1 if idx is None else idx))


def _chain(fe: Frontend, driver: SplitDriver, descs: list[tuple[int, int, int, int]],
           table: bool = False) -> None:
    mem = fe.mem
    assert mem is not None
    base = mem.alloc(16 * len(descs)) if table else driver.desc
    for i, desc in enumerate(descs):
        mem.write(base + 16 * i, DESC.pack(*desc))
    if table:
        mem.write(driver.desc, DESC.pack(base, 16 * len(descs), DESC_F_INDIRECT, 0))
    _avail(fe, driver, 0)


def _hdr(fe: Frontend) -> int:
    assert fe.mem is not None
    gpa = fe.mem.alloc(16)
    fe.mem.write(gpa, struct.pack("<IIQ", T_IN, 0, 0))
    return gpa


def _fds(n: int) -> list[int]:
    return [os.eventfd(0) for _ in range(n)]


PROTOCOL_ERRORS: dict[str, tuple[Callable[[Frontend], None], str]] = {
    "unknown": (lambda fe: fe.send(99), "vu_panic: Unhandled request: 99"),
    "too-big": (lambda fe: fe.send(3, bytes(273)),
                "Error: too big message request: 3, size: vmsg->size: 273, "
                "while sizeof(vmsg->payload) = 272"),
    "nine-fds": (lambda fe: fe.send(SET_VRING_KICK, struct.pack("=Q", 0), fds=_fds(9)),
                 "A maximum of 8 fds are allowed, however got 9 fds now"),
    "kick-index": (lambda fe: fe.send(SET_VRING_KICK, struct.pack("=Q", 7), fds=_fds(1)),
                   "vu_panic: Invalid queue index: 7"),
    "kick-no-fd": (lambda fe: fe.send(SET_VRING_KICK, struct.pack("=Q", 0)),
                   "vu_panic: Invalid fds in request: 12"),
    "call-index": (lambda fe: fe.send(SET_VRING_CALL, struct.pack("=Q", 9), fds=_fds(1)),
                   "vu_panic: Invalid queue index: 9"),
    "enable-index": (lambda fe: fe.send(SET_VRING_ENABLE, struct.pack("=II", 9, 1)),
                     "vu_panic: Invalid vring_enable index: 9"),
    "num-index": (lambda fe: fe.send(SET_VRING_NUM, struct.pack("=II", 9, 128)),
                  "vu_panic: Invalid vring_num index: 9"),
    "addr-index": (lambda fe: fe.send(SET_VRING_ADDR, struct.pack("=IIQQQQ", 9, 0, 0, 0, 0, 0)),
                   "vu_panic: Invalid vring_addr index: 9"),
    "base-index": (lambda fe: fe.send(SET_VRING_BASE, struct.pack("=II", 9, 0)),
                   "vu_panic: Invalid vring_base index: 9"),
    "get-base-index": (lambda fe: fe.send(GET_VRING_BASE, struct.pack("=II", 9, 0)),
                       "vu_panic: Invalid vring_base index: 9"),
    "legacy": (lambda fe: fe.send(SET_FEATURES, struct.pack("=Q", 0)),
               "vu_panic: virtio legacy devices aren't supported by libvhost-user"),
    "addr-unmapped": (lambda fe: fe.send(SET_VRING_ADDR, struct.pack(
        "=IIQQQQ", 0, 0, 0x1000, 0x2000, 0x3000, 0)), "vu_panic: Invalid vring_addr message"),
    "add-reg-no-fd": (lambda fe: fe.send(ADD_MEM_REG, bytes(40)),
                      "vu_panic: VHOST_USER_ADD_MEM_REG received 0 fds - only 1 fd should be "
                      "sent for this message type"),
    "add-reg-short": (lambda fe: fe.send(ADD_MEM_REG, bytes(8), fds=[Memory(4096).fd]),
                      "vu_panic: VHOST_USER_ADD_MEM_REG requires a message size of at least 32 "
                      "bytes and only 8 bytes were received"),
    "rem-reg-missing": (lambda fe: fe.send(REM_MEM_REG, bytes(40)),
                        "vu_panic: Specified region not found"),
    "set-config": (lambda fe: fe.send(SET_CONFIG, struct.pack("=III", 0, 1, 0) + b"\1"),
                   "vu_panic: Set virtio configuration space failed"),
    "get-inflight-size": (lambda fe: fe.send(GET_INFLIGHT_FD, bytes(20)),
                          "vu_panic: Invalid get_inflight_fd message:20"),
    "set-inflight-no-fd": (lambda fe: fe.send(SET_INFLIGHT_FD, struct.pack(
        "=QQHH4x", 4096, 0, 1, 128)), "vu_panic: Invalid set_inflight_fd message size:24 fds:0"),
    "overlap": (lambda fe: fe.send(SET_MEM_TABLE, struct.pack("=II", 2, 0) + _region(
        m := Memory(MiB)) * 2, fds=[m.fd, m.fd]),
        "vu_panic: regions with overlapping guest physical addresses"),
    # QEMU's back-end spins forever on this one; qsd checks the table first.
    "fewer-fds": (lambda fe: fe.send(SET_MEM_TABLE, struct.pack("=II", 3, 0) + _region(
        m := Memory(MiB)), fds=[m.fd]),
        "vu_panic: Invalid mem table message: 3 regions, 1 fds, 40 bytes"),
    # QEMU's back-end maps this and crashes on the first access past the file's end.
    "beyond-file": (lambda fe: fe.send(SET_MEM_TABLE, struct.pack("=II", 1, 0) + struct.pack(
        "=QQQQ", 0, 2 * MiB, 0x7F0000000000, 0), fds=[Memory(MiB).fd]),
        "vu_panic: region mmap error: region exceeds its file"),
    "not-a-file": (lambda fe: fe.send(SET_MEM_TABLE, struct.pack("=II", 1, 0) + struct.pack(
        "=QQQQ", 0, 4096, 0x7F0000000000, 0), fds=_fds(1)),
        "vu_panic: region mmap error: No such device"),
    # The rings.
    "head-out-of-range": (_bad_ring(lambda fe, d: _avail(fe, d, 200)),
                          "vu_panic: Guest says index 200 is available"),
    # 11.1.3 checks the available index only where it counts available bytes: it takes
    # the (empty) descriptor and fails on its zero size instead.
    "avail-jump": (_bad_ring(lambda fe, d: _avail(fe, d, 0, 300)),
                   "vu_panic: Guest moved used index from 0 to 300"),
    "unmapped-buffer": (_bad_ring(lambda fe, d: _chain(fe, d, [(0x1000, 16, 0, 0)])),
                        "vu_panic: virtio: invalid address for buffers"),
    "zero-length": (_bad_ring(lambda fe, d: _chain(fe, d, [(_hdr(fe), 0, 0, 0)])),
                    "vu_panic: virtio: zero sized buffers are not allowed"),
    "loop": (_bad_ring(lambda fe, d: _chain(fe, d, [(_hdr(fe), 16, DESC_F_NEXT, 1),
                                                    (_hdr(fe), 16, DESC_F_NEXT, 0)])),
             "vu_panic: Looped descriptor"),
    "next-out-of-range": (_bad_ring(lambda fe, d: _chain(fe, d, [
        (_hdr(fe), 16, DESC_F_NEXT, 500)])), "vu_panic: Desc next is 500"),
    "indirect-size": (_bad_ring(lambda fe, d: fe.mem.write(  # type: ignore[union-attr]
        d.desc, DESC.pack(_hdr(fe), 17, DESC_F_INDIRECT, 0)) or _avail(fe, d, 0)),
        "vu_panic: Invalid size for indirect buffer table"),
    "indirect-loop": (_bad_ring(lambda fe, d: _chain(fe, d, [
        (_hdr(fe), 16, DESC_F_NEXT, 1), (_hdr(fe), 16, DESC_F_NEXT, 0)], table=True)),
        "vu_panic: Looped descriptor"),
    "order": (_bad_ring(lambda fe, d: _chain(fe, d, [(_hdr(fe), 16, DESC_F_WRITE | DESC_F_NEXT, 1),
                                                     (_hdr(fe), 16, 0, 0)])),
              "vu_panic: Incorrect order for descriptors"),
}


def test_protocol_errors(workdir: Path, start_qsd: QsdFactory) -> None:
    """Each broken message or ring: QEMU's report on stderr, the connection dropped, the
    export still serving the next front-end, and nothing left behind in qsd."""
    daemon = start_qsd(*export_args(workdir, extra=",writable=on"))
    sock = str(workdir / "vu.sock")
    probe = Frontend(sock)
    probe.u64(GET_QUEUE_NUM)
    baseline = qsd_fds(daemon.pid)
    probe.close()
    for name, (send, report) in PROTOCOL_ERRORS.items():
        fe = Frontend(sock)
        send(fe)
        assert fe.is_closed(), name
        fe.close()
        probe = Frontend(sock)
        probe.setup()
        assert probe.read(0, 0, 512)[0] == S_OK, name
        probe.close()
        probe = Frontend(sock)
        probe.u64(GET_QUEUE_NUM)
        assert qsd_fds(daemon.pid) == baseline, name
        assert guest_mappings(daemon.pid) == 0, name
        probe.close()
        assert report in daemon.read_stderr(), name
    assert daemon.proc.poll() is None


def test_requests_without_headers_are_dropped(workdir: Path, start_qsd: QsdFactory) -> None:
    """As in 11.1.3: reported, never completed, and the device goes on serving."""
    daemon = start_qsd(*export_args(workdir, extra=",writable=on"))
    fe = Frontend(str(workdir / "vu.sock"))
    fe.setup()
    driver = fe.queues[0]
    assert isinstance(driver, SplitDriver) and fe.mem is not None
    status = fe.mem.alloc(1, 1)
    assert driver.add([(_hdr(fe), 16, False)]) is not None
    assert driver.add([(_hdr(fe), 8, False), (status, 1, True)]) is not None
    fe.kick(0)
    assert fe.write(0, 0, b"B" * 512) == S_OK
    assert fe.read(0, 0, 512) == (S_OK, b"B" * 512)
    assert driver.completions() == []
    report = daemon.read_stderr()
    assert "virtio-blk request missing headers" in report
    assert "virtio-blk request outhdr too short" in report
    assert "vu_panic" not in report
    fe.close()


def test_messages_that_keep_the_connection(workdir: Path, start_qsd: QsdFactory) -> None:
    daemon = start_qsd(*export_args(workdir))
    fe = Frontend(str(workdir / "vu.sock"))
    fe.send(0)     # VHOST_USER_NONE: reported, as QEMU does, but not fatal
    assert fe.u64(GET_QUEUE_NUM) == 1
    fe.send(1, flags=2)    # a wrong version is not checked
    assert fe.recv()[0] == GET_FEATURES
    fe.close()
    assert "vu_panic: disconnect" in daemon.read_stderr()


# ---- connections ----------------------------------------------------------------------------

def test_one_front_end_at_a_time_and_reconnect(workdir: Path, start_qsd: QsdFactory) -> None:
    daemon = start_qsd(*export_args(workdir, extra=",writable=on,num-queues=2"))
    sock = str(workdir / "vu.sock")
    first = Frontend(sock)
    first.setup(2)
    assert first.write(0, 0, b"A" * 4096) == S_OK
    second = Frontend(sock, timeout=0.5)
    second.send(GET_QUEUE_NUM)
    with pytest.raises(TimeoutError):
        second.recv()       # waits in the backlog until the first goes away
    first.close()           # gone without a word: no GET_VRING_BASE
    second.sock.settimeout(20)
    assert struct.unpack("=Q", second.recv()[2])[0] == 2
    second.setup(2)
    assert second.read(1, 0, 4096) == (S_OK, b"A" * 4096)
    second.close()
    for i in range(5):
        fe = Frontend(sock)
        fe.setup(2, packed=bool(i % 2))
        assert fe.write(i % 2, 8 * i, bytes([i]) * 4096) == S_OK
        assert fe.read(1 - i % 2, 8 * i, 4096) == (S_OK, bytes([i]) * 4096)
        fe.close()
    fe = Frontend(sock)
    fe.u64(GET_QUEUE_NUM)
    assert guest_mappings(daemon.pid) == 0
    fe.close()


def test_memory_hotplug(workdir: Path, start_qsd: QsdFactory) -> None:
    """ADD_MEM_REG/REM_MEM_REG while a queue runs; a ring whose memory is gone waits."""
    start_qsd(*export_args(workdir, extra=",writable=on"))
    fe = Frontend(str(workdir / "vu.sock"))
    fe.setup()
    extra = Memory(MiB)
    region = struct.pack("=QQQQQ", 0, 1 << 40, MiB, 0x6000_0000_0000, 0)
    fe.send(ADD_MEM_REG, region, fds=[extra.fd])
    assert fe.write(0, 0, b"B" * 512) == S_OK
    fe.send(REM_MEM_REG, region)
    assert fe.read(0, 0, 512) == (S_OK, b"B" * 512)
    assert fe.mem is not None
    main = struct.pack("=Q", 0) + _region(fe.mem)
    fe.send(REM_MEM_REG, main)
    fe.send(ADD_MEM_REG, main, fds=[fe.mem.fd])
    assert fe.read(0, 0, 512) == (S_OK, b"B" * 512)
    fe.close()
    extra.close()


def test_get_vring_base_waits_for_requests(workdir: Path, start_qsd: QsdFactory) -> None:
    """A stopped ring is suspended: requests taken before GET_VRING_BASE are finished and
    in the used ring when the reply comes."""
    start_qsd("--blockdev", "null-co,node-name=disk,size=67108864,latency-ns=200000000",
              "--export", f"vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                          f"addr.path={workdir}/vu.sock")
    fe = Frontend(str(workdir / "vu.sock"))
    fe.setup()
    for i in range(4):
        fe.submit(0, Request(T_IN, i, read_len=512))
    time.sleep(0.05)
    assert fe.stop_queue(0) == 4
    assert len(fe.queues[0].completions()) == 4
    fe.close()


def test_inflight_resubmission(workdir: Path, start_qsd: QsdFactory) -> None:
    """qsd dies with requests in flight, after a later one completed; the front-end keeps
    the inflight buffer, restarts the ring at the used index as QEMU does, and the new
    qsd finishes exactly the requests that were in flight (none twice, none lost)."""
    args = export_args(workdir, extra=",writable=on")
    with open(workdir / "disk.img", "r+b") as f:
        f.write(b"".join(bytes([0x40 + i]) * 4096 for i in range(4)))
    sock = str(workdir / "vu.sock")
    daemon = start_qsd("--blockdev",
                       "null-co,node-name=slow,size=67108864,latency-ns=30000000000",
                       "--export", f"vhost-user-blk,id=e0,node-name=slow,addr.type=unix,"
                                   f"addr.path={sock}")
    fe = Frontend(sock)
    fe.negotiate()
    inflight, fds = fe.call_fds(GET_INFLIGHT_FD, struct.pack("=QQHH4x", 0, 0, 1, 128))
    size, offset, queues, queue_size = struct.unpack("=QQHH4x", inflight)
    assert (offset, queues, queue_size) == (0, 1, 128) and len(fds) == 1
    assert size >= 128 * 16
    fe.send(SET_INFLIGHT_FD, inflight, fds=fds)
    mem = Memory(16 * MiB)
    fe.set_memory(mem)
    driver = fe.start_queue(0)
    slow = [Request(T_IN, 0, read_len=4096), Request(T_IN, 16, read_len=4096)]
    get_id = Request(T_GET_ID, 0, read_len=20)
    for req in (slow[0], get_id, slow[1]):
        fe.submit(0, req)
    assert fe.wait(0, 1) == [(get_id, 21)]
    fe.u64(GET_QUEUE_NUM)
    daemon.proc.kill()
    daemon.proc.wait()

    # A new qsd on the same socket path, serving the image file this time.
    start_qsd(*args)
    again = Frontend(sock)
    again.negotiate()
    again.send(SET_INFLIGHT_FD, inflight, fds=fds)
    again.set_memory(mem)
    again.queues[0] = driver
    again.requests = fe.requests
    again.send(SET_VRING_NUM, struct.pack("=II", 0, 128))
    again.send(SET_VRING_BASE, struct.pack("=II", 0, 1))
    desc, avail, used = (mem.uva(a) for a in driver.addrs())
    again.send(SET_VRING_ADDR, struct.pack("=IIQQQQ", 0, 0, desc, used, avail, 0))
    again.calls[0] = os.eventfd(0, os.EFD_NONBLOCK)
    again.kicks[0] = os.eventfd(0, os.EFD_NONBLOCK)
    again.send(SET_VRING_CALL, struct.pack("=Q", 0), fds=[again.calls[0]])
    again.send(SET_VRING_KICK, struct.pack("=Q", 0), fds=[again.kicks[0]])
    done = again.wait(0, 2)
    assert sorted(req.sector for req, _ in done) == [0, 16]
    assert again.data(slow[0]) == b"\x40" * 4096 and again.data(slow[1]) == b"\x42" * 4096
    assert again.status(slow[0]) == again.status(slow[1]) == S_OK
    # Nothing else comes back, and the ring goes on from there.
    assert again.read(0, 8, 4096) == (S_OK, b"\x41" * 4096)
    assert again.stop_queue(0) == 4
    for fd in (fe.kicks.pop(0), fe.calls.pop(0), fds[0]):
        os.close(fd)
    fe.sock.close()
    again.close()


def _thread_ticks(pid: int, name: str) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def test_drain_and_iothread_moves_under_load(workdir: Path, start_qsd: QsdFactory) -> None:
    """Graph changes drain the node while a front-end keeps requests coming; a
    single-thread export follows its node into another iothread, queues and all."""
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       *export_args(workdir, extra=",writable=on,num-queues=2"))
    mon = Monitor(daemon)
    fe = Frontend(str(workdir / "vu.sock"))
    fe.setup(2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        i = 0
        try:
            while not stop.is_set():
                data = bytes([i % 256]) * 4096
                assert fe.write(i % 2, 8 * (i % 512), data) == S_OK
                assert fe.read(1 - i % 2, 8 * (i % 512), 4096) == (S_OK, data)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for i in range(10):
            mon.ok("block_resize", **{"node-name": "disk"}, size=(64 + i % 2) * MiB)
            time.sleep(0.02)
        for iothread in ("io0", "io1", None):
            mon.ok("x-blockdev-set-iothread", **{"node-name": "disk"}, iothread=iothread,
                   force=True)
            if iothread is not None:
                # The queues work in the node's new thread now.
                goal = _thread_ticks(daemon.pid, iothread) + 5
                wait_until(lambda name=iothread, goal=goal:  # type: ignore[misc]
                           _thread_ticks(daemon.pid, name) >= goal)
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    fe.close()
