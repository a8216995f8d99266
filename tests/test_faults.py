"""Injected and real I/O errors, as the clients of qsd's exports see them.

Per errno, a blkdebug node fails reads and writes of one sector (another node fails
every flush); a raw node above it is exported over FUSE or NBD.  FUSE readers and
writers (the process itself: os.pread/os.pwrite, dd) get the errno; NBD clients (libnbd,
qemu-io) get the NBD error QEMU maps it to, and lose the connection on a read error with
structured replies, as with QEMU 11.1.3's server.  The rest of the disk still reads and
writes, another export still serves, and the monitor still answers.  Then a real full
filesystem: fio fills an image on a small tmpfs through FUSE with --continue_on_error,
and every write it had acknowledged reads back.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from tests.harness import Monitor, Qsd

MiB = 1 << 20
SECTOR = 64                       # the sector the rules fail: bytes 32768-33279
BAD = SECTOR * 512
# errno injected -> the errno an NBD client gets (QEMU's system_errno_to_nbd_errno)
ERRNOS = {
    errno.EIO: errno.EIO,
    errno.ENOSPC: errno.ENOSPC,
    errno.EPERM: errno.EPERM,
    errno.EROFS: errno.EPERM,
    errno.EDQUOT: errno.ENOSPC,
    errno.EINVAL: errno.EINVAL,
}


def _name(code: int) -> str:
    return errno.errorcode[code].lower()


def _rules(code: int) -> str:
    """Keyval options for a read rule and a write rule on SECTOR, armed by the raw
    node's events."""
    return ",".join(
        f"inject-error.{i}.event={event},inject-error.{i}.iotype={iotype},"
        f"inject-error.{i}.errno={code},inject-error.{i}.sector={SECTOR}"
        for i, (event, iotype) in enumerate((("read_aio", "read"), ("write_aio", "write"))))


def _monitor(qsd: Qsd) -> Monitor:
    """The monitor, once start-up is over (it greets only then); a daemon that failed to
    start shows its error."""
    try:
        return Monitor(qsd)
    except ConnectionError:
        qsd.stop()
        raise AssertionError(qsd.stderr.decode()) from None


class Setup:
    def __init__(self, workdir: Path, qsd: Qsd, sock: Path) -> None:
        self.workdir = workdir
        self.qsd = qsd
        self.sock = sock

    def mount(self, name: str) -> Path:
        return self.workdir / f"mnt-{name}"

    def image(self, name: str) -> Path:
        return self.workdir / f"{name}.raw"

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    """One daemon: for FUSE and for NBD, a disk per errno and one whose flushes fail
    (blkdebug over an image file, raw above, the raw node exported), and a healthy
    null-co disk exported both ways."""
    workdir = Path(tempfile.mkdtemp(prefix="qsd-faults-", dir="/tmp"))
    sock = workdir / "nbd.sock"
    args = ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
    disks = {_name(code): _rules(code) for code in ERRNOS}
    disks["flush"] = "inject-error.0.event=flush_to_disk,inject-error.0.iotype=flush"
    for kind in ("fuse", "nbd"):
        for name, rules in disks.items():
            node = f"{kind}-{name}"
            image = workdir / f"{node}.raw"
            image.write_bytes(bytes(range(256)) * (MiB // 256))
            args += ["--blockdev", f"file,node-name=f-{node},filename={image}",
                     "--blockdev", f"blkdebug,node-name=d-{node},image=f-{node},{rules}",
                     "--blockdev", f"raw,node-name={node},file=d-{node}"]
            if kind == "fuse":
                (workdir / f"mnt-{node}").touch()
                args += ["--export", f"fuse,id={node},node-name={node},"
                                     f"mountpoint={workdir}/mnt-{node},writable=on"]
            else:
                args += ["--export", f"nbd,id={node},node-name={node},writable=on"]
    (workdir / "mnt-other").touch()
    args += ["--blockdev", "null-co,node-name=other,size=1048576,read-zeroes=on",
             "--export", f"fuse,id=fuse-other,node-name=other,mountpoint={workdir}/mnt-other",
             "--export", "nbd,id=nbd-other,node-name=other"]
    qsd = Qsd(workdir, args)
    try:
        # the monitor greets once start-up is over: every export is there
        monitor = _monitor(qsd)
        exports = monitor.ok("query-block-exports")
        monitor.raw.close()
        assert len(exports) == 2 * (len(disks) + 1), exports
        yield Setup(workdir, qsd, sock)
    finally:
        qsd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _still_serving(setup: Setup) -> None:
    """The monitor answers and the healthy export reads, over FUSE and NBD."""
    monitor = Monitor(setup.qsd)       # the chardev takes one client at a time
    try:
        nodes = {n["node-name"] for n in monitor.ok("query-named-block-nodes")}
    finally:
        monitor.raw.close()
    assert {"other", "fuse-eio", "nbd-flush"} <= nodes
    fd = os.open(setup.mount("other"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == bytes(4096)
    finally:
        os.close(fd)
    h = nbd.NBD()
    h.connect_uri(setup.uri("other"))
    assert h.pread(4096, MiB - 4096) == bytes(4096)
    h.shutdown()
    assert setup.qsd.proc.poll() is None


@pytest.mark.parametrize("code", list(ERRNOS), ids=_name)
def test_fuse_readers_and_writers_get_the_errno(setup: Setup, code: int) -> None:
    name = f"fuse-{_name(code)}"
    image = setup.image(name)
    before = image.read_bytes()
    fd = os.open(setup.mount(name), os.O_RDWR)
    try:
        with pytest.raises(OSError) as read_error:
            os.pread(fd, 4096, BAD)
        assert read_error.value.errno == code
        with pytest.raises(OSError) as write_error:
            os.pwrite(fd, b"\xee" * 4096, BAD)
        assert write_error.value.errno == code
        # the rest of the disk: reads and writes go through, and are acknowledged
        assert os.pread(fd, 4096, 0) == before[:4096]
        assert os.pread(fd, 4096, BAD + 4096) == before[BAD + 4096:BAD + 8192]
        assert os.pwrite(fd, b"\x11" * 4096, 0) == 4096
    finally:
        os.close(fd)
    after = image.read_bytes()
    assert after[:4096] == b"\x11" * 4096           # the acknowledged write is there
    assert after[4096:] == before[4096:]            # the failed one changed nothing
    # dd, another reading process, reports the same error
    dd = subprocess.run(["dd", f"if={setup.mount(name)}", "of=/dev/null", "bs=4096",
                         f"skip={BAD // 4096}", "count=1", "iflag=direct"],
                        capture_output=True, text=True, timeout=30)
    assert dd.returncode == 1
    assert os.strerror(code) in dd.stderr, dd.stderr
    _still_serving(setup)


def _nbd(setup: Setup, name: str, structured: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(setup.uri(name))
    return h


def _fails(request: Callable[[], object], code: int) -> None:
    """The libnbd request fails with ``code`` (libnbd names the errno)."""
    with pytest.raises(nbd.Error) as error:
        request()
    assert error.value.errno == errno.errorcode[code], error.value


@pytest.mark.parametrize("code", list(ERRNOS), ids=_name)
def test_nbd_clients_get_the_mapped_error(setup: Setup, code: int) -> None:
    """As QEMU 11.1.3's server: the errno mapped to an NBD error for every request of a
    simple-reply client and for writes of a structured-reply one; a read error on a
    structured-reply connection ends that connection (QEMU's sparse read sends no error
    chunk), and the daemon says why on stderr and goes on serving."""
    name = f"nbd-{_name(code)}"
    expected = ERRNOS[code]
    h = _nbd(setup, name, structured=False)
    _fails(lambda: h.pread(4096, BAD), expected)
    _fails(lambda: h.pwrite(b"\xee" * 4096, BAD), expected)
    data = h.pread(4096, BAD + 4096)               # the connection goes on serving
    h.pwrite(data, BAD + 4096)
    h.shutdown()
    h = _nbd(setup, name)
    _fails(lambda: h.pwrite(b"\xee" * 4096, BAD), expected)
    assert h.pread(4096, 0) == bytes(range(256)) * 16
    _fails(lambda: h.pread(4096, BAD), errno.ENOTCONN)
    setup.qsd.read_stderr()
    # qemu-io, QEMU's own NBD client: its read error ends the connection the same way
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write {BAD} 4096",
                         "-c", "read 0 4096", "-c", f"read {BAD} 4096", setup.uri(name)],
                        capture_output=True, text=True, timeout=30)
    lines = [line for line in io.stdout.splitlines() if "ops;" not in line]
    assert lines == [f"write failed: {os.strerror(expected)}",
                     "read 4096/4096 bytes at offset 0",
                     "read failed: Input/output error"], io.stdout
    reason = f"reading from file failed: {os.strerror(code)}"
    stderr = setup.qsd.read_stderr()
    assert stderr.count(f"Disconnect client, due to: Failed to send reply: {reason}") == 1, \
        stderr
    _still_serving(setup)


def test_failed_flush_reaches_both_clients(setup: Setup) -> None:
    """fsync() and close() on the FUSE file and NBD_CMD_FLUSH fail with EIO, while
    reads and writes of the same disk go through."""
    fd = os.open(setup.mount("fuse-flush"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\x22" * 512, 0) == 512
        with pytest.raises(OSError) as error:
            os.fsync(fd)
        assert error.value.errno == errno.EIO
    finally:
        with pytest.raises(OSError) as close_error:
            os.close(fd)
        assert close_error.value.errno == errno.EIO
    h = _nbd(setup, "nbd-flush")
    h.pwrite(b"\x22" * 512, 0)
    assert h.pread(512, 0) == b"\x22" * 512
    _fails(h.flush, errno.EIO)
    assert h.pread(512, 0) == b"\x22" * 512
    h.shutdown()
    _still_serving(setup)


def test_once_and_set_state(setup: Setup) -> None:
    """blockdev-add at run time: a rule that fails once, and one that a state change
    arms only from the second read on."""
    m = Monitor(setup.qsd)
    image = setup.workdir / "state.raw"
    image.write_bytes(bytes(MiB))
    m.ok("blockdev-add", driver="file", **{"node-name": "f-state"}, filename=str(image))
    m.ok("blockdev-add", driver="blkdebug", **{"node-name": "d-state"}, image="f-state",
         **{"inject-error": [{"event": "write_aio", "errno": errno.ENOSPC, "once": True},
                             {"event": "read_aio", "state": 2}],
            "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}]})
    m.ok("blockdev-add", driver="raw", **{"node-name": "state"}, file="d-state")
    m.ok("block-export-add", type="nbd", id="nbd-state", **{"node-name": "state"},
         writable=True)
    h = _nbd(setup, "state", structured=False)
    _fails(lambda: h.pwrite(b"\x33" * 512, 0), errno.ENOSPC)
    h.pwrite(b"\x33" * 512, 0)                     # once: the rule is gone
    assert h.pread(512, 0) == b"\x33" * 512        # state 1 -> 2, nothing armed yet
    for _ in range(2):
        _fails(lambda: h.pread(512, 0), errno.EIO)
    h.shutdown()
    m.ok("block-export-del", id="nbd-state")
    m.wait_event("BLOCK_EXPORT_DELETED")
    for node in ("state", "d-state", "f-state"):
        m.ok("blockdev-del", **{"node-name": node})
    m.raw.close()
    _still_serving(setup)


# ---- a real full filesystem ----------------------------------------------------------------


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted and removed whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="qsd-enospc-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_enospc_on_a_full_filesystem(small_fs: Path) -> None:
    """fio fills an 8 MiB sparse image on a 2 MiB tmpfs through FUSE: writes past the
    space fail with ENOSPC and fio goes on.  Then the disk is exported over NBD instead:
    every block fio had acknowledged reads back, and once space is freed a write that
    failed before is acknowledged and kept."""
    workdir = Path(tempfile.mkdtemp(prefix="qsd-enospc-", dir="/tmp"))
    ballast = small_fs / "ballast"
    ballast.write_bytes(bytes(512 * 1024))
    image = small_fs / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    mp = workdir / "mnt"
    mp.touch()
    sock = workdir / "nbd.sock"
    qsd = Qsd(workdir, [
        "--blockdev", f"file,node-name=file0,filename={image}",
        "--blockdev", "raw,node-name=disk,file=file0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"fuse,id=fuse0,node-name=disk,mountpoint={mp},writable=on"])
    try:
        monitor = _monitor(qsd)
        block = 64 * 1024
        # ENOSPC is fatal to fio unless ignored; fio then counts the failed writes
        fio = subprocess.run(
            ["fio", "--name=fill", f"--filename={mp}", "--rw=write", f"--bs={block}",
             "--size=4M", "--direct=1", "--ioengine=psync", "--continue_on_error=all",
             "--ignore_error=EIO,ENOSPC", "--buffer_pattern=0x5a5aa5a5",
             "--output-format=json"],
            capture_output=True, text=True, timeout=60)
        job = json.loads(fio.stdout)["jobs"][0]
        written, errors = job["write"]["io_bytes"], job["total_err"]
        blocks = 4 * MiB // block
        assert job["error"] == errno.ENOSPC and errors and written, fio.stdout
        assert written % block == 0 and written // block + errors == blocks
        # One job writing in order on a filesystem that stays full: the writes fio had
        # acknowledged are the first ones, the failed ones all those after.
        acknowledged = range(0, written, block)
        failed = range(written, 4 * MiB, block)
        retry = failed[0]
        fd = os.open(mp, os.O_RDWR)
        try:
            with pytest.raises(OSError) as error:
                os.pwrite(fd, b"\x77" * block, retry)
            assert error.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        monitor.ok("block-export-del", id="fuse0")
        monitor.wait_event("BLOCK_EXPORT_DELETED")
        monitor.ok("block-export-add", type="nbd", id="nbd0", **{"node-name": "disk"},
                   writable=True)
        assert [n["node-name"] for n in monitor.ok("query-named-block-nodes")] \
            == ["disk", "file0"]
        monitor.raw.close()
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///disk?socket={sock}")
        pattern = bytes.fromhex("5a5aa5a5") * (block // 4)
        for offset in acknowledged:
            assert h.pread(block, offset) == pattern, offset
        for offset in failed[1:]:                   # the first may hold a part
            assert h.pread(block, offset) == bytes(block), offset
        ballast.unlink()
        h.pwrite(b"\x77" * block, retry)
        assert h.pread(block, retry) == b"\x77" * block
        h.shutdown()
        assert qsd.proc.poll() is None
    finally:
        qsd.stop()
        shutil.rmtree(workdir, ignore_errors=True)
