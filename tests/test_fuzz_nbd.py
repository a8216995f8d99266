"""The NBD server's handshake and request decoder, fuzzed through a real daemon's socket.

Each hypothesis example is one connection: client flags (usually right), a run of
options (well-formed ones of every kind, unknown ones, payloads that lie about their
length), then perhaps NBD_OPT_GO or NBD_OPT_EXPORT_NAME and a run of requests with
offsets, lengths and flags at and past every limit, in compact or extended headers.
What the daemon must do:

- answer each well-formed option with replies for that option that end in an ACK or an
  error, and each framed request with exactly one well-formed reply for its cookie
  (simple, structured or extended, as negotiated); never NBD_EIO (nothing fails below);
- after anything malformed, answer what it can and close the connection, never hang;
- what a READ of the file-backed export answers is what the image holds;
- a session of nothing but well-formed options and plain requests is never hung up on;
- after each example a well-behaved client still reads and the daemon has printed no
  traceback; at the end its fds, threads and asyncio tasks are back where they were
  (tests/leaks.py) and a monitor still answers ``query-version``.

A few hundred examples in `make test`; QSD_FUZZ=1 (`make stress`) runs 20,000 (over
100,000 options and requests).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd.nbd import protocol as P
from tests.harness import Monitor, Qsd, wait_for_listener
from tests.leaks import Counters, assert_no_leaks, settled

EXAMPLES = 20000 if os.environ.get("QSD_FUZZ") == "1" else 400
MiB = 1 << 20
DISK = MiB
BIG = 1 << 40
NBD_ERRORS = {0, P.NBD_EPERM, P.NBD_EIO, P.NBD_ENOMEM, P.NBD_EINVAL, P.NBD_ENOSPC,
              P.NBD_EOVERFLOW, P.NBD_ENOTSUP, P.NBD_ESHUTDOWN}


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Server:
    qsd: Qsd
    sock: Path
    image: Path
    examples: int = 0
    # Counters taken once the first tenth of the examples ran (each kind of reply has
    # sized its buffers by then).
    before: Counters | None = None


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A daemon with the leak probe: a 1 MiB file export, a 1 TiB null one (both
    writable) and a read-only one; its counters are compared at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="qsd-fuzz-nbd-", dir="/tmp"))
    image = tmp / "disk.raw"
    image.write_bytes(bytes(range(256)) * (DISK // 256))
    sock = tmp / "nbd.sock"
    qsd = Qsd(tmp, ["--blockdev", f"file,node-name=disk,filename={image}",
                    "--blockdev", f"null-co,node-name=big,size={BIG}",
                    "--nbd-server", f"addr.type=unix,addr.path={sock}",
                    "--export", "nbd,id=disk,node-name=disk,writable=on",
                    "--export", "nbd,id=big,node-name=big,writable=on",
                    "--export", "nbd,id=ro,node-name=disk,name=ro"], probe=True)
    try:
        wait_for_listener(qsd.probe_path, qsd.proc)
        wait_for_listener(sock, qsd.proc)
        served = Server(qsd, sock, image)
        yield served
        if served.before is not None:
            assert_no_leaks(qsd, served.before)
        monitor = Monitor(qsd)
        assert monitor.ok("query-version")["qemu"]["major"] == 11
        monitor.raw.close()
    finally:
        qsd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- a client that believes nothing ------------------------------------------------------------


class Conn:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.structured = False
        self.extended = False

    def recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            try:
                chunk = self.sock.recv(min(n - len(data), 1 << 20))
            except ConnectionResetError:
                raise Closed from None
            if not chunk:
                raise Closed
            data += chunk
        return bytes(data)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            raise Closed from None

    def drain(self) -> None:
        """Sends nothing more and reads until the server closes (a hang fails here)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(1 << 20):
                pass
        except OSError:            # reset, or already closed
            pass

    def close(self) -> None:
        self.sock.close()


def _healthy_read(server: Server) -> None:
    """A well-behaved client: GO and one read of the file export."""
    conn = Conn(server.sock)
    try:
        _greeting(conn, P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)
        assert _option(conn, P.NBD_OPT_GO, _name_payload("disk"))[-1][0] == P.NBD_REP_ACK
        conn.send(struct.pack(">IHHQQI", P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, 1,
                                      4096, 512))
        magic, error, cookie = struct.unpack(">IIQ", conn.recv(16))
        assert (magic, error, cookie) == (P.NBD_SIMPLE_REPLY_MAGIC, 0, 1)
        with open(server.image, "rb") as f:            # as the fuzz's writes left it
            assert conn.recv(512) == os.pread(f.fileno(), 512, 4096)
    finally:
        conn.close()


def _greeting(conn: Conn, flags: int) -> None:
    greeting = conn.recv(18)
    assert greeting[:16] == struct.pack(">QQ", P.NBD_INIT_MAGIC, P.NBD_OPTS_MAGIC)
    conn.send(struct.pack(">I", flags))


def _name_payload(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def _option(conn: Conn, opt: int, payload: bytes) -> list[tuple[int, bytes]]:
    conn.send(struct.pack(">QII", P.NBD_OPTS_MAGIC, opt, len(payload)) + payload)
    replies = []
    while True:
        magic, ropt, rtype, length = struct.unpack(">QIII", conn.recv(20))
        assert magic == P.NBD_REP_MAGIC and ropt == opt, (hex(magic), ropt, opt)
        assert length <= P.NBD_MAX_STRING_SIZE + 64, length
        replies.append((rtype, conn.recv(length)))
        if rtype == P.NBD_REP_ACK or rtype & P.NBD_REP_ERR:
            return replies


# ---- what hypothesis draws ---------------------------------------------------------------------
#
# One draw of bytes for the session and one for each option and request, from which every
# field is read: hypothesis spends its time on draws, not bytes, and zeroes shrink to the
# simplest session (a well-formed option, a plain read, each table's first value).

NAMES = ["disk", "big", "ro", "", "missing", "x" * 4097, "disk\0", "\u00e9"]
QUERIES = ["base:allocation", "qemu:allocation-depth", "qemu:", "base:", "base:x",
           "qemu:dirty-bitmap:x", "nope:x", ""]
OFFSETS = [0, 1, 511, 512, DISK - 512, DISK - 1, DISK, DISK + 1, BIG - 512, BIG - 1, BIG,
           2**32, 2**63 - 1, 2**63, 2**64 - 1]
LENGTHS = [512, 0, 1, 4096, 65536, P.NBD_MAX_BUFFER_SIZE, P.NBD_MAX_BUFFER_SIZE + 1, 2**31,
           2**32 - 1, 2**32, 2**63, 2**64 - 1]
GOOD_OPTIONS = [P.NBD_OPT_INFO, P.NBD_OPT_LIST, P.NBD_OPT_STRUCTURED_REPLY,
                P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT,
                P.NBD_OPT_EXTENDED_HEADERS, P.NBD_OPT_STARTTLS, P.NBD_OPT_PEEK_EXPORT]
FLAGS = [0, P.NBD_CMD_FLAG_FUA, P.NBD_CMD_FLAG_NO_HOLE, P.NBD_CMD_FLAG_DF,
         P.NBD_CMD_FLAG_REQ_ONE, P.NBD_CMD_FLAG_FAST_ZERO, P.NBD_CMD_FLAG_PAYLOAD_LEN]
CLIENT_FLAGS = [P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES,
                P.NBD_FLAG_C_FIXED_NEWSTYLE, 0, P.NBD_FLAG_C_NO_ZEROES]
ENDINGS = ["go", "go", "go", "export-name", "abort", "none"]
EXPORTS = ["disk", "disk", "big", "ro", "missing"]
OPTION_SEED = 48
REQUEST_SEED = 40


class Seed:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def unpack(self, fmt: str, at: int) -> int:
        return int(struct.unpack_from(">" + fmt, self.raw, at)[0])

    def pick(self, selector: int, table: list[int], fmt: str, at: int,
             threshold: int = 208) -> int:
        """A value of the table (at and past the limits), or now and then any value."""
        b = self.raw[selector]
        return table[b % len(table)] if b < threshold else self.unpack(fmt, at)

    def word(self, selector: int, table: list[str]) -> bytes:
        return table[self.raw[selector] % len(table)].encode()


@dataclass(frozen=True)
class Option:
    opt: int
    payload: bytes
    length: int | None                 # what the header says, when it lies
    wellformed: bool                   # a known option with a payload of its shape


def _option_from(s: Seed) -> Option:
    opt = s.pick(0, GOOD_OPTIONS, "I", 4)
    if opt == P.NBD_OPT_INFO:
        name = s.word(4, NAMES)
        infos = [s.pick(8 + i, [0, 1, 2, 3], "H", 16 + 2 * i, 240) for i in range(s.raw[5] % 5)]
        payload = (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                   + b"".join(struct.pack(">H", i) for i in infos))
    elif opt in (P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT):
        name = s.word(4, NAMES)
        queries = [s.word(8 + i, QUERIES) for i in range(s.raw[6] % 5)]
        payload = (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
                   + b"".join(struct.pack(">I", len(q)) + q for q in queries))
    else:
        payload = b""
    wellformed = opt in GOOD_OPTIONS
    if s.raw[1] >= 216:
        payload = s.raw[16:16 + s.raw[2] % 33]
        wellformed = False
    lies = [0, 1, 3, len(payload) + 1, 2**32 - 1, P.NBD_MAX_BUFFER_SIZE + 1]
    length = None if s.raw[3] < 216 else lies[s.raw[3] % len(lies)]
    return Option(opt, payload, length, wellformed)


@dataclass(frozen=True)
class Request:
    flags: int
    cmd: int
    offset: int
    length: int
    payload: int | None              # bytes of data sent after the header, if any

    def plain(self, size: int) -> bool:
        """A request any server must answer and go on: a known command without flags,
        within the export, of at most 1 MiB (data included)."""
        return (self.cmd in (P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_FLUSH,
                             P.NBD_CMD_TRIM, P.NBD_CMD_CACHE, P.NBD_CMD_WRITE_ZEROES)
                and self.flags == 0 and 0 < self.length <= MiB
                and self.offset + self.length <= size
                and self.payload == (self.length if self.cmd == P.NBD_CMD_WRITE else None))


def _request_from(s: Seed) -> Request:
    cmd = s.pick(0, list(range(9)), "H", 8, 224)
    flags = s.pick(1, FLAGS, "H", 10, 224)
    offset = s.pick(2, OFFSETS, "Q", 16, 192)
    b = s.raw[3]
    length = LENGTHS[b % len(LENGTHS)] if b < 64 else \
        s.unpack("H", 12) % 8193 if b < 232 else s.unpack("Q", 24)
    payload = None
    if cmd == P.NBD_CMD_WRITE or flags & P.NBD_CMD_FLAG_PAYLOAD_LEN:
        payload = length if s.raw[4] < 208 else s.raw[4] % 65
    return Request(flags, cmd, offset, length, payload)


@dataclass(frozen=True)
class Session:
    client_flags: int
    options: list[Option]
    ending: tuple[str, str]
    requests: list[Request]


def _session_from(head: bytes, options: list[bytes], requests: list[bytes]) -> Session:
    s = Seed(head)
    return Session(s.pick(0, CLIENT_FLAGS, "I", 4, 240),
                   [_option_from(Seed(o)) for o in options],
                   (ENDINGS[s.raw[1] % len(ENDINGS)], EXPORTS[s.raw[2] % len(EXPORTS)]),
                   [_request_from(Seed(r)) for r in requests])


SESSIONS = st.builds(
    _session_from, st.binary(min_size=8, max_size=8),
    st.lists(st.binary(min_size=OPTION_SEED, max_size=OPTION_SEED), max_size=6),
    st.lists(st.binary(min_size=REQUEST_SEED, max_size=REQUEST_SEED), max_size=6))


# ---- one connection ---------------------------------------------------------------------------


def _reply(conn: Conn, req: Request, cookie: int, image: Path | None) -> None:
    """Reads the answer to ``req``: chunks until the last, all for ``cookie``; checks a
    successful read of the file export against the image."""
    data: dict[int, bytes] = {}
    while True:
        (magic,) = struct.unpack(">I", conn.recv(4))
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            assert not conn.extended
            error, got = struct.unpack(">IQ", conn.recv(12))
            assert got == cookie and error in NBD_ERRORS and error != P.NBD_EIO, (got, error)
            if error == 0 and req.cmd == P.NBD_CMD_READ:
                data[req.offset] = conn.recv(req.length)
            break
        if magic == P.NBD_STRUCTURED_REPLY_MAGIC:
            assert conn.structured and not conn.extended
            flags, ctype, got, length = struct.unpack(">HHQI", conn.recv(16))
        else:
            assert magic == P.NBD_EXTENDED_REPLY_MAGIC and conn.extended, hex(magic)
            flags, ctype, got, _, length = struct.unpack(">HHQQQ", conn.recv(28))
        assert got == cookie and length <= P.NBD_MAX_BUFFER_SIZE + 64, (got, length)
        body = conn.recv(length)
        if ctype == P.NBD_REPLY_TYPE_OFFSET_DATA:
            data[struct.unpack_from(">Q", body)[0]] = body[8:]
        elif ctype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
            offset, size = struct.unpack(">QI", body)
            data[offset] = bytes(size)
        elif ctype & (1 << 15):
            assert ctype in (P.NBD_REPLY_TYPE_ERROR, P.NBD_REPLY_TYPE_ERROR + 1), ctype
            (error,) = struct.unpack_from(">I", body)
            assert error in NBD_ERRORS and error not in (0, P.NBD_EIO), error
        if flags & P.NBD_REPLY_FLAG_DONE:
            break
    if image is not None and data:
        with open(image, "rb") as f:
            for offset, chunk in data.items():
                assert req.offset <= offset and offset + len(chunk) <= req.offset + req.length
                assert os.pread(f.fileno(), len(chunk), offset) == chunk, offset


def _session(server: Server, client_flags: int, opts: list[Option], ending: tuple[str, str],
             reqs: list[Request]) -> None:
    """One connection.  While everything sent was well-formed (``strict``) the server
    must not hang up; after anything else it may."""
    conn = Conn(server.sock)
    strict = client_flags & P.NBD_FLAG_C_FIXED_NEWSTYLE != 0
    try:
        _greeting(conn, client_flags)
        if client_flags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES):
            conn.drain()             # unknown client flags: the server hangs up
            return
        for option in opts:
            strict = strict and option.wellformed
            if option.length is not None and option.length != len(option.payload):
                conn.send(struct.pack(">QII", P.NBD_OPTS_MAGIC, option.opt,
                                              option.length) + option.payload)
                conn.drain()
                return
            replies = _option(conn, option.opt, option.payload)
            if replies[-1][0] == P.NBD_REP_ACK:
                if option.opt == P.NBD_OPT_STRUCTURED_REPLY:
                    conn.structured = True
                elif option.opt == P.NBD_OPT_EXTENDED_HEADERS:
                    conn.extended = conn.structured = True
        how, name = ending
        strict = strict and how == "go" and name != "missing"
        if how == "abort":
            assert _option(conn, P.NBD_OPT_ABORT, b"")[-1][0] == P.NBD_REP_ACK
            conn.drain()
            return
        if how == "none":
            conn.drain()
            return
        if how == "export-name":
            conn.send(struct.pack(">QII", P.NBD_OPTS_MAGIC, P.NBD_OPT_EXPORT_NAME,
                                          len(name)) + name.encode())
            if name == "missing":
                conn.drain()
                return
            size, _ = struct.unpack(">QH", conn.recv(10))
            if not client_flags & P.NBD_FLAG_C_NO_ZEROES:
                assert conn.recv(124) == bytes(124)
        else:
            replies = _option(conn, P.NBD_OPT_GO, _name_payload(name))
            if replies[-1][0] != P.NBD_REP_ACK:
                assert name == "missing", replies
                conn.drain()
                return
        image = server.image if name in ("disk", "ro") else None
        size = BIG if name == "big" else DISK
        for cookie, req in enumerate(reqs, start=1):
            strict = strict and req.plain(size)
            if conn.extended:
                header = struct.pack(">IHHQQQ", P.NBD_EXTENDED_REQUEST_MAGIC, req.flags,
                                     req.cmd, cookie, req.offset, req.length)
            else:
                header = struct.pack(">IHHQQI", P.NBD_REQUEST_MAGIC, req.flags, req.cmd,
                                     cookie, req.offset, req.length & 0xFFFFFFFF)
            framed = req.payload is None or (req.payload == req.length and req.length <= MiB)
            if req.cmd == P.NBD_CMD_DISC or not framed:
                conn.send(header + bytes(min(req.payload or 0, 64)))
                conn.drain()
                return
            conn.send(header + bytes(req.payload or 0))
            sent = Request(req.flags, req.cmd, req.offset, req.length & (
                2**64 - 1 if conn.extended else 0xFFFFFFFF), req.payload)
            _reply(conn, sent, cookie, image)
        conn.send(struct.pack(">IHHQQI", P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_DISC,
                                      0, 0, 0) if not conn.extended else struct.pack(
            ">IHHQQQ", P.NBD_EXTENDED_REQUEST_MAGIC, 0, P.NBD_CMD_DISC, 0, 0, 0))
        conn.drain()
    except Closed:
        assert not strict, "the server hung up on a well-formed session"
    finally:
        conn.close()


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(session=SESSIONS)
def test_nbd_server(server: Server, session: Session) -> None:
    server.examples += 1
    if server.examples == max(1, EXAMPLES // 10):
        server.before = settled(server.qsd)
    _session(server, session.client_flags, session.options, session.ending,
             session.requests)
    _healthy_read(server)
    stderr = server.qsd.read_stderr()
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr


def test_zero_length_write(server: Server) -> None:
    """Found by this fuzzer: a write of 0 bytes failed an assertion in the request
    decoder (a traceback, the connection lost); 11.1.3 answers it with success."""
    for extended in (False, True):
        conn = Conn(server.sock)
        try:
            _greeting(conn, P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)
            if extended:
                assert _option(conn, P.NBD_OPT_EXTENDED_HEADERS, b"")[-1][0] == P.NBD_REP_ACK
                conn.extended = conn.structured = True
            assert _option(conn, P.NBD_OPT_GO, _name_payload("disk"))[-1][0] == P.NBD_REP_ACK
            if extended:
                conn.send(struct.pack(">IHHQQQ", P.NBD_EXTENDED_REQUEST_MAGIC, 0,
                                      P.NBD_CMD_WRITE, 5, 4096, 0))
                flags, ctype, cookie, _, length = struct.unpack(">HHQQQ", conn.recv(32)[4:])
                assert (flags, ctype, cookie, length) == (
                    P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 5, 0)
            else:
                conn.send(struct.pack(">IHHQQI", P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, 5,
                                      4096, 0))
                assert struct.unpack(">IIQ", conn.recv(16)) == (P.NBD_SIMPLE_REPLY_MAGIC, 0, 5)
        finally:
            conn.close()
    _healthy_read(server)
    stderr = server.qsd.read_stderr()
    assert "Traceback" not in stderr, stderr
