"""The NBD server in the real daemon: QMP control, QEMU's tools as clients, removal.

Where Debian's qemu-storage-daemon is installed, its answers for the same setup are the
reference (its qemu-nbd 7.2 client does not negotiate extended headers, so both list the
flags without block-status-payload).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd.nbd import protocol as P
from tests.harness import QSD, Monitor, Qsd, nbd_flags, nbd_list, wait_for_path
from tests.test_nbd_protocol import Raw, meta_payload


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory: concurrent pytest runs may rotate each other's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="qsd-nbd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image(workdir: Path) -> Path:
    """2 MiB raw image: data at 0-64k and 1M-1M+4k, holes elsewhere."""
    path = workdir / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(2 << 20)
        f.write(b"\xaa" * 65536)
        f.seek(1 << 20)
        f.write(b"\x55" * 4096)
    return path


def blockdevs(image: Path) -> list[str]:
    return ["--blockdev", f"file,node-name=file0,filename={image}",
            "--blockdev", "raw,node-name=disk,file=file0"]


@pytest.fixture
def daemon(workdir: Path, image: Path) -> Iterator[tuple[Qsd, Path]]:
    sock_dir = Path(tempfile.mkdtemp(prefix="qsd-nbd-", dir="/tmp"))
    sock = sock_dir / "nbd.sock"
    qsd = Qsd(workdir, blockdevs(image) + [
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=ro,node-name=disk",
        "--export", "nbd,id=rw,node-name=disk,name=rw,writable=on,description=hello"])
    try:
        wait_for_path(sock, qsd.proc)
        yield qsd, sock
    finally:
        qsd.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def nbd_uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def test_list_matches_qemu(daemon: tuple[Qsd, Path], image: Path, workdir: Path) -> None:
    _, sock = daemon
    ours = nbd_list(sock)
    assert nbd_flags(ours, 0x58f, "readonly flush fua df multi cache") in ours
    assert nbd_flags(ours, 0xded, "flush fua trim zeroes df multi cache fast-zero") in ours
    assert "base:allocation" in ours
    reference = shutil.which("qemu-storage-daemon")
    if reference is None:
        pytest.skip("QEMU's qemu-storage-daemon is not installed")
    ref_sock = Path(tempfile.mkdtemp(prefix="qemu-nbd-", dir="/tmp")) / "nbd.sock"
    proc = subprocess.Popen([reference] + blockdevs(image) + [
        "--nbd-server", f"addr.type=unix,addr.path={ref_sock}",
        "--export", "nbd,id=ro,node-name=disk",
        "--export", "nbd,id=rw,node-name=disk,name=rw,writable=on,description=hello"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_path(ref_sock, None)
        assert ours == nbd_list(ref_sock)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(ref_sock.parent, ignore_errors=True)


def test_qemu_tools(daemon: tuple[Qsd, Path], image: Path, workdir: Path) -> None:
    _, sock = daemon
    ro, rw = nbd_uri(sock, "disk"), nbd_uri(sock, "rw")
    info = subprocess.run(["qemu-img", "info", "-f", "raw", ro], capture_output=True,
                          text=True, check=True, timeout=20).stdout
    assert "virtual size: 2 MiB (2097152 bytes)" in info
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", ro, str(image)],
                   check=True, timeout=20, capture_output=True)
    copy = workdir / "copy.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", ro, str(copy)],
                   check=True, timeout=20)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", ro, str(copy)], check=True,
                   timeout=20, capture_output=True)
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 128k 8k",
                         "-c", "read -P 0x11 128k 8k", "-c", "read -P 0xaa 0 64k",
                         "-c", "write -z 0 4k", "-c", "read -P 0 0 4k", "-c", "flush", rw],
                        capture_output=True, text=True, timeout=20)
    assert io.returncode == 0 and "failed" not in io.stdout + io.stderr, io
    assert image.read_bytes()[128 << 10:136 << 10] == b"\x11" * 8192
    readonly = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", ro],
                              capture_output=True, text=True, timeout=20)
    assert "Permission denied" in readonly.stderr  # the client sees the read-only flag
    lines = [line.split() for line in subprocess.run(
        ["nbdinfo", "--map", ro], capture_output=True, text=True, check=True,
        timeout=20).stdout.splitlines()]
    assert lines[0][3] == "data" and lines[1][3] == "hole,zero"
    assert any(line[0] == str(1 << 20) and line[3] == "data" for line in lines)


def test_libnbd_structured_and_block_status(daemon: tuple[Qsd, Path]) -> None:
    _, sock = daemon
    for structured in (True, False):
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(nbd_uri(sock, "disk"))
        assert h.get_structured_replies_negotiated() == structured
        assert h.is_read_only() and h.can_multi_conn()
        assert h.can_df() == structured
        assert h.pread(65536 * 2, 0) == b"\xaa" * 65536 + bytes(65536)
        if structured:
            extents: list[int] = []

            def collect(ctx: str, off: int, ents: list[int], err: int,
                        out: list[int] = extents) -> int:
                out.extend(ents)
                return 0

            h.block_status(2 << 20, 0, collect)
            assert extents[:4] == [65536, 0, (1 << 20) - 65536, 3]
        h.shutdown()


def test_qmp_server_control(workdir: Path, image: Path) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="qsd-nbd-", dir="/tmp"))
    sock = sock_dir / "nbd.sock"
    qsd = Qsd(workdir, blockdevs(image))
    try:
        mon = Monitor(qsd)
        assert mon.err("nbd-server-stop") == "NBD server not running"
        assert mon.err("block-export-add", type="nbd", id="e", **{"node-name": "disk"}) \
            == "NBD server not running"
        mon.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        assert mon.err("nbd-server-start", addr={"type": "unix", "data": {"path": "/x"}}) \
            == "NBD server already running"
        mon.ok("block-export-add", type="nbd", id="e", **{"node-name": "disk"})
        assert mon.err("block-export-add", type="nbd", id="e2", name="disk",
                       **{"node-name": "disk"}) == "NBD server already has export named 'disk'"
        assert mon.err("block-export-add", type="nbd", id="e3", name="x" * 4097,
                       **{"node-name": "disk"}) == f"export name '{'x' * 4097}' too long"
        assert mon.err("nbd-server-add", device="disk", name="e") \
            == "Block export id 'e' is already in use"
        assert mon.err("nbd-server-add", device="nope") \
            == "Cannot find device='nope' nor node-name='nope'"
        mon.ok("nbd-server-add", device="disk", name="legacy", writable=True)
        assert "export: 'legacy'" in nbd_list(sock)
        mon.ok("nbd-server-remove", name="legacy")
        assert mon.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "legacy"}
        exports = mon.ok("query-block-exports")
        assert [e["id"] for e in exports] == ["e"]
        # Stopping the server deletes its exports.
        mon.ok("nbd-server-stop")
        assert mon.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e"}
        assert mon.ok("query-block-exports") == []
        assert not sock.exists()
        assert mon.err("nbd-server-start", addr={"type": "inet", "data": {
            "host": "127.0.0.1", "port": "0"}}, **{"tls-creds": "t0"}) \
            == "No TLS credentials with id 't0'"
        mon.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}},
               **{"max-connections": 1})
        mon.ok("block-export-add", type="nbd", id="e", **{"node-name": "disk"})
        listing = nbd_list(sock)
        assert nbd_flags(listing, 0x48f, "readonly flush fua df cache") in listing
    finally:
        qsd.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


class QemuIo:
    """An interactive qemu-io client that stays connected between commands."""

    PROMPT = b"qemu-io> "

    def __init__(self, uri: str) -> None:
        self.proc = subprocess.Popen(["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._until_prompt()

    def _until_prompt(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + 10
        while not out.endswith(self.PROMPT):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"qemu-io is stuck: {out!r}"
            chunk = os.read(fd, 65536)
            assert chunk, f"qemu-io exited: {out!r}"
            out += chunk
        return out[:-len(self.PROMPT)].decode()

    def run(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def test_safe_and_hard_removal(daemon: tuple[Qsd, Path]) -> None:
    qsd, sock = daemon
    mon = Monitor(qsd)
    client = QemuIo(nbd_uri(sock, "rw"))
    try:
        assert "read 512/512 bytes" in client.run("read 0 512")
        assert mon.err("block-export-del", id="rw") == "export 'rw' still in use"
        assert mon.err("nbd-server-remove", name="rw", mode="safe") \
            == "export 'rw' still in use"
        mon.ok("block-export-del", id="rw", mode="hard")
        assert mon.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "rw"}
        assert "read failed: Input/output error" in client.run("read 0 512")
    finally:
        client.close()
    # The other export and the server keep serving.
    assert "export: 'disk'" in nbd_list(sock)
    mon.ok("block-export-del", id="ro")
    assert mon.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "ro"}


def test_a_client_that_has_left_does_not_hold_the_export(daemon: tuple[Qsd, Path]) -> None:
    """A client whose NBD_CMD_DISC reached the daemon before block-export-del does not keep
    the export in use: QEMU drops a client as it reads the command, so a management tool
    may delete an export (mode safe) as soon as its backup client has exited.  The daemon
    is stopped while both arrive, so that they are ready in the same poll of its loop."""
    qsd, sock = daemon
    mon = Monitor(qsd)
    for rnd in range(5):
        client = Raw(str(sock))
        client.go("rw")
        os.kill(qsd.pid, signal.SIGSTOP)
        try:
            client.sock.sendall(struct.pack(">IHHQQI", P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_DISC,
                                            rnd, 0, 0))
            client.sock.close()
            mon.send("block-export-del", id="rw")
        finally:
            os.kill(qsd.pid, signal.SIGCONT)
        reply = mon.reply()
        assert reply == {"return": {}}, f"round {rnd}: {reply}"
        assert mon.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "rw"}
        mon.ok("block-export-add", type="nbd", id="rw", **{"node-name": "disk"}, name="rw",
               writable=True)


def test_extended_headers(daemon: tuple[Qsd, Path]) -> None:
    _, sock = daemon
    r = Raw(str(sock))
    assert r.option(P.NBD_OPT_EXTENDED_HEADERS)[-1][0] == P.NBD_REP_ACK
    replies = r.option(P.NBD_OPT_SET_META_CONTEXT, meta_payload("rw", "base:allocation"))
    assert replies[0] == (P.NBD_REP_META_CONTEXT, b"\0\0\0\0base:allocation")
    assert r.go("rw") == 0x1DED
    r.ext_request(P.NBD_CMD_READ, 65536 - 4, 8)
    flags, ctype, cookie, offset, body = r.ext_chunk()
    assert (flags, ctype, cookie, offset) == (0, P.NBD_REPLY_TYPE_OFFSET_DATA, 7, 65532)
    assert body == struct.pack(">Q", 65532) + b"\xaa" * 4
    flags, ctype, _, _, body = r.ext_chunk()
    assert (flags, ctype) == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_HOLE)
    assert struct.unpack(">QI", body) == (65536, 4)
    r.ext_request(P.NBD_CMD_BLOCK_STATUS, 0, 12, P.NBD_CMD_FLAG_PAYLOAD_LEN,
                  payload=struct.pack(">QI", 1 << 20, 0))
    flags, ctype, _, _, body = r.ext_chunk()
    assert (flags, ctype) == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_BLOCK_STATUS_EXT)
    assert struct.unpack(">IIQQQQ", body) == (0, 2, 65536, 0, (1 << 20) - 65536, 3)
    r.ext_request(P.NBD_CMD_WRITE, 1 << 21, 1, P.NBD_CMD_FLAG_PAYLOAD_LEN, payload=b"x")
    flags, ctype, _, _, body = r.ext_chunk()
    assert ctype == P.NBD_REPLY_TYPE_ERROR
    assert body[6:] == b"operation past EOF; From: 2097152, Len: 1, Size: 2097152"
    r.ext_request(P.NBD_CMD_DISC, 0, 0)
    assert r.sock.recv(1) == b""


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(handshake=st.binary(max_size=64), extended=st.booleans(),
       garbage=st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 12),
                                  st.integers(0, 2**64 - 1), st.integers(0, 2**40),
                                  st.binary(max_size=40)), max_size=4))
def test_malformed_input(daemon: tuple[Qsd, Path], handshake: bytes, extended: bool,
                         garbage: list[tuple[int, int, int, int, bytes]]) -> None:
    """Garbage in the handshake or the requests: an error reply or a clean disconnect,
    and the daemon keeps serving other clients."""
    qsd, sock = daemon
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(sock))
    try:
        s.sendall(handshake)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    except OSError:
        pass  # a reset is a clean disconnect too
    s.close()
    r = Raw(str(sock))
    if extended:
        r.option(P.NBD_OPT_EXTENDED_HEADERS)
    r.go("disk")
    magic = P.NBD_EXTENDED_REQUEST_MAGIC if extended else P.NBD_REQUEST_MAGIC
    fmt = ">IHHQQQ" if extended else ">IHHQQI"
    try:
        for flags, cmd, offset, length, tail in garbage:
            length &= (2**64 - 1) if extended else 0xFFFFFFFF
            r.sock.sendall(struct.pack(fmt, magic, flags, cmd, 1, offset, length) + tail)
        r.sock.shutdown(socket.SHUT_WR)
        while r.sock.recv(65536):
            pass
    except OSError:
        pass
    r.sock.close()
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock, "disk"))
    assert h.pread(4, 0) == b"\xaa" * 4
    h.shutdown()
    assert qsd.proc.poll() is None


def test_server_address_errors_match_qemu(workdir: Path, image: Path) -> None:
    """The texts qemu-storage-daemon 11.1.3 answers for addresses it cannot listen on."""
    qsd = Qsd(workdir, blockdevs(image))
    try:
        mon = Monitor(qsd)
        too_long = "/tmp/" + "x" * 120
        for addr, desc in [
            ({"type": "vsock", "data": {"cid": "x", "port": "1234"}}, "Failed to parse cid 'x'"),
            ({"type": "vsock", "data": {"cid": "1", "port": "y"}}, "Failed to parse port 'y'"),
            ({"type": "vsock", "data": {"cid": "4294967296", "port": "1"}},
             "Failed to parse cid '4294967296'"),
            ({"type": "fd", "data": {"str": "foo"}}, "only QEMU supports file descriptor passing"),
            ({"type": "fd", "data": {"str": "0"}}, "only QEMU supports file descriptor passing"),
            ({"type": "unix", "data": {"path": too_long}},
             f"UNIX socket path '{too_long}' is too long"),
            ({"type": "unix", "data": {"path": "/nonexistent/x.sock"}},
             "Failed to bind socket to /nonexistent/x.sock: No such file or directory"),
            ({"type": "inet", "data": {"host": "127.0.0.1", "port": "xyz"}},
             "address resolution failed for 127.0.0.1:xyz: Servname not supported for "
             "ai_socktype"),
        ]:
            assert mon.err("nbd-server-start", addr=addr) == desc
        if hasattr(socket, "AF_VSOCK") and os.path.exists("/dev/vsock"):
            mon.ok("nbd-server-start", addr={"type": "vsock", "data": {
                "cid": "4294967295", "port": "0"}})
            mon.ok("nbd-server-stop")
    finally:
        qsd.stop()


@pytest.mark.parametrize(("value", "stderr"), [
    ("addr.type=fd,addr.str=abc", "Unable to parse FD number abc"),
    ("addr.type=fd,addr.str=0", "File descriptor '0' is not a socket"),
    ("addr.type=vsock,addr.cid=x,addr.port=1", "Failed to parse cid 'x'"),
])
def test_command_line_server_address_errors(value: str, stderr: str) -> None:
    result = subprocess.run(QSD + ["--nbd-server", value], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stderr) == (1, f"qsd: --nbd-server {value}: {stderr}\n")


OPTS = struct.pack(">Q", P.NBD_OPTS_MAGIC)
FIXED = struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE)


def test_negotiation_failures_on_stderr(workdir: Path, image: Path) -> None:
    """Each broken handshake leaves the line qemu-storage-daemon 11.1.3 prints for it."""
    sock_dir = Path(tempfile.mkdtemp(prefix="qsd-nbd-", dir="/tmp"))
    sock = sock_dir / "nbd.sock"
    # No handshake timer at first: a loaded machine must not turn a case into a timeout.
    qsd = Qsd(workdir, blockdevs(image) + [
        "--nbd-server", f"addr.type=unix,addr.path={sock},handshake-max-seconds=0",
        "--export", "nbd,id=e0,node-name=disk"])
    eof = "Unexpected end-of-file before all data were read"
    cases: list[tuple[bytes, str | None]] = [
        (b"\0\0", None),  # a port probe is not worth a message
        (FIXED + b"IHAVE", f"Failed to read opts magic: {eof}"),
        (FIXED + OPTS + b"\0", f"Failed to read option: {eof}"),
        (FIXED + OPTS + struct.pack(">I", 7) + b"\0", f"Failed to read option length: {eof}"),
        (FIXED + OPTS + struct.pack(">II", P.NBD_OPT_GO, 10) + b"\0\0", eof),
        (FIXED + b"\0" * 8, "Bad magic received"),
        (FIXED + OPTS + struct.pack(">II", P.NBD_OPT_GO, 0x7FFFFFFF),
         "len (2147483647) is larger than max len (33554432)"),
        (struct.pack(">I", 0) + OPTS + struct.pack(">II", P.NBD_OPT_GO, 0),
         "Unsupported option 7 (go)"),
        (FIXED + OPTS + struct.pack(">II", P.NBD_OPT_EXPORT_NAME, 4) + b"ab",
         f"Failed to read export name: {eof}"),
        (FIXED + OPTS + struct.pack(">II", P.NBD_OPT_EXPORT_NAME, 5000), "Bad length received"),
        (FIXED + OPTS + struct.pack(">II", P.NBD_OPT_EXPORT_NAME, 0), "export not found"),
    ]
    try:
        wait_for_path(sock, qsd.proc)
        for payload, _ in cases:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            s.connect(str(sock))
            assert len(s.recv(18)) == 18
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(65536):
                    pass
            s.close()
        # Closing with the server's reply unread makes its next read fail with a reset.
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(str(sock))
        s.recv(18)
        s.sendall(FIXED + OPTS + struct.pack(">II", P.NBD_OPT_LIST, 4) + b"\0" * 4)
        assert len(s.recv(1)) == 1
        s.close()
        # The handshake timer cuts a client that stops talking.
        mon = Monitor(qsd)
        mon.ok("nbd-server-stop")
        mon.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}},
               **{"handshake-max-seconds": 1})
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(str(sock))
        s.recv(18)
        s.sendall(FIXED)
        assert s.recv(1) == b""
        s.close()
    finally:
        qsd.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    expected = [f"qsd: option negotiation failed: {line}" for _, line in cases if line]
    expected += [
        "qsd: option negotiation failed: Failed to read opts magic: Unable to read from "
        "socket: Connection reset by peer",
        f"qsd: option negotiation failed: Failed to read opts magic: {eof}"]
    assert sorted(qsd.stderr.decode().splitlines()) == sorted(expected)
