"""The nbd block driver with real servers and real clients.

qsd A serves an image over NBD; qsd B opens it with ``driver=nbd`` and re-exports it over
FUSE, where fio writes and verifies (crc32c) through both daemons. The server is also
QEMU 11.1.3's daemon. Across two network namespaces the test makes (a veth pair, a
private /30), the link is cut in the middle of a fio run: with ``reconnect-delay`` the run
survives (on a new TCP connection), without it fio sees EIO while the daemon goes on
serving QMP and reconnects once the link is back. So that a cut of a few seconds breaks
the connection, client B's namespace gives up on unacknowledged data after two
retransmissions (``tcp_retries2``) and, with ``server.keep-alive=on``, on a silent peer
after two unanswered probes a second apart (while all requests wait for replies, the
client has nothing to retransmit). Last, the
same chain over TLS with x509 credentials.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import Qsd, fuse_mounts, wait_for_listener
from tests.tls_certs import make_credentials

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
SID_CHROOT = ROOT / "scripts" / "sid-chroot"
SERVER_ADDR = "10.254.0.1"
CLIENT_ADDR = "10.254.0.2"


def qmp(daemon: Qsd, command: str, **arguments: object) -> dict[str, object]:
    monitor = daemon.connect_raw()
    try:
        monitor.negotiate()
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        reply: dict[str, object] = json.loads(monitor.command(json.dumps(request).encode()))
        while "event" in reply:
            reply = json.loads(monitor.recv_line())
        return reply
    finally:
        monitor.close()


def fio(path: Path, *args: str) -> list[str]:
    return ["fio", "--name=t", f"--filename={path}", "--direct=1", "--bs=4k",
            "--ioengine=libaio", "--iodepth=16", "--verify_state_save=0",
            "--output-format=terse", *args]


VERIFY = ("--rw=randwrite", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1")


def run(*cmd: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, check=False)


def check(*cmd: str | Path, timeout: float = 60) -> str:
    result = run(*cmd, timeout=timeout)
    assert result.returncode == 0, (cmd, result.stdout, result.stderr)
    return result.stdout


def client(start_qsd: QsdFactory, mountpoint: Path, server: str, options: str = "",
           *args: str, netns: str | None = None) -> Qsd:
    """qsd B: the server's export ``img`` as node ``n`` (more ``options`` for it), over
    FUSE at ``mountpoint``; ``args`` come first on its command line."""
    mountpoint.touch()
    daemon = start_qsd(*args, "--object", "iothread,id=io0",
                       "--blockdev", f"nbd,node-name=n,{server},export=img{options}",
                       "--export", f"fuse,id=x,node-name=n,mountpoint={mountpoint},"
                       "writable=on,iothread=io0", netns=netns)
    assert qmp(daemon, "query-block-exports")["return"] != []   # the greeting: ready
    assert str(mountpoint) in fuse_mounts()
    return daemon


# ---- qsd to qsd over a unix socket ---------------------------------------------------------


def test_chain_qcow2_fio_and_block_status(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    image = fuse_dir / "a.qcow2"
    check("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    sock_a = fuse_dir / "a.sock"
    start_qsd("--blockdev", f"file,node-name=f,filename={image}",
              "--blockdev", "qcow2,node-name=q,file=f",
              "--nbd-server", f"addr.type=unix,addr.path={sock_a}",
              "--export", "nbd,id=e,node-name=q,name=img,writable=on")
    mp = fuse_dir / "b.fuse"
    sock_c = fuse_dir / "c.sock"
    b = client(start_qsd, mp, f"server.type=unix,server.path={sock_a}")
    out = check(*fio(mp, *VERIFY, "--size=8M", "--numjobs=2", "--offset_increment=16M"),
                timeout=120)
    assert out.count(";") > 100      # two terse result lines
    # What B reads is what A's image holds.
    check("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", mp, image)
    # Block status through the nbd driver: qsd C opens A's export read-only and serves
    # it again over NBD, where qemu-img maps it.
    c = start_qsd("--blockdev", f"nbd,node-name=n,server.type=unix,server.path={sock_a},"
                  "export=img,read-only=on",
                  "--nbd-server", f"addr.type=unix,addr.path={sock_c}",
                  "--export", "nbd,id=e,node-name=n,name=img")
    assert qmp(c, "query-block-exports")["return"] != []
    extents = json.loads(check("qemu-img", "map", "--output=json", "-f", "raw",
                               f"nbd+unix:///img?socket={sock_c}"))
    data = sum(e["length"] for e in extents if e["data"])
    holes = [e for e in extents if not e["data"] and e["zero"]]
    assert data >= 8 * MiB and holes and holes[-1]["start"] + holes[-1]["length"] == 64 * MiB
    nodes = qmp(b, "query-named-block-nodes")["return"]
    assert isinstance(nodes, list)
    assert nodes[0]["image"]["filename"] == f"nbd+unix:///img?socket={sock_a}"


# ---- qsd against QEMU 11.1.3's daemon as the server --------------------------------------


def have_sid_chroot() -> None:
    if not SID_CHROOT.exists() or run(SID_CHROOT, "run", "true", timeout=60).returncode:
        pytest.skip("the sid chroot with QEMU 11.1.3 is not set up")


@contextlib.contextmanager
def qemu_daemon(sock: Path, *args: str) -> Iterator[None]:
    """QEMU 11.1.3's daemon with ``args``, once ``sock`` listens; ended by PID."""
    proc = subprocess.Popen([str(SID_CHROOT), "run", "qemu-storage-daemon", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_listener(sock, proc, timeout=60)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def qemu_server(fuse_dir: Path) -> Iterator[Path]:
    """QEMU 11.1.3's daemon serving a raw image as ``img`` on a unix socket."""
    have_sid_chroot()
    sock_dir = Path(f"/tmp/qsd-nbdc-{uuid.uuid4().hex[:8]}")
    sock_dir.mkdir()
    image = sock_dir / "img.raw"
    image.write_bytes(b"")
    os.truncate(image, 64 * MiB)
    sock = sock_dir / "nbd.sock"
    try:
        with qemu_daemon(sock, "--blockdev", f"file,node-name=f,filename={image}",
                         "--nbd-server", f"addr.type=unix,addr.path={sock}",
                         "--export", "nbd,id=e,node-name=f,name=img,writable=on"):
            yield sock
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_against_qemu_server(fuse_dir: Path, start_qsd: QsdFactory,
                             qemu_server: Path) -> None:
    mp = fuse_dir / "b.fuse"
    b = client(start_qsd, mp, f"server.type=unix,server.path={qemu_server}")
    check(*fio(mp, *VERIFY, "--size=16M"), timeout=120)
    nodes = qmp(b, "query-named-block-nodes")["return"]
    assert isinstance(nodes, list)
    limits = nodes[0]["image"]["limits"]
    assert limits["request-alignment"] == 1 and limits["max-transfer"] == 32 * MiB


# ---- across two network namespaces, with the link cut ------------------------------------


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair: the server's and the client's."""
    if shutil.which("ip") is None or shutil.which("ss") is None:
        pytest.skip("iproute2 is not installed (the sid chroot has none)")
    tag = uuid.uuid4().hex[:8]
    server, client_ns = f"qsd-srv-{tag}", f"qsd-cli-{tag}"
    made: list[str] = []
    try:
        for name in (server, client_ns):
            check("ip", "netns", "add", name)
            made.append(name)
        check("ip", "link", "add", "vs", "netns", server, "type", "veth",
              "peer", "name", "vc", "netns", client_ns)
        for name, dev, addr in ((server, "vs", SERVER_ADDR), (client_ns, "vc", CLIENT_ADDR)):
            check("ip", "-n", name, "addr", "add", f"{addr}/30", "dev", dev)
            check("ip", "-n", name, "link", "set", dev, "up")
            check("ip", "-n", name, "link", "set", "lo", "up")
        check("ip", "netns", "exec", client_ns, "sysctl", "-q", "-w",
              "net.ipv4.tcp_retries2=2", "net.ipv4.tcp_keepalive_time=1",
              "net.ipv4.tcp_keepalive_intvl=1", "net.ipv4.tcp_keepalive_probes=2")
        yield server, client_ns
    finally:
        for name in made:
            run("ip", "netns", "del", name)


def link(netns: str, state: str) -> None:
    check("ip", "-n", netns, "link", "set", "vc", state)


def connections(netns: str) -> set[str]:
    """The client's established TCP connections to the server (local ports)."""
    out = check("ip", "netns", "exec", netns, "ss", "-Htn", "state", "established",
                "dst", SERVER_ADDR)
    return {line.split()[2].rsplit(":", 1)[1] for line in out.splitlines() if line.strip()}


def served(fuse_dir: Path, start_qsd: QsdFactory, hosts: tuple[str, str],
           options: str = "") -> tuple[Qsd, Path]:
    server_ns, client_ns = hosts
    image = fuse_dir / "a.raw"
    image.write_bytes(b"")
    os.truncate(image, 64 * MiB)
    start_qsd("--blockdev", f"file,node-name=f,filename={image}",
              "--nbd-server", f"addr.type=inet,addr.host={SERVER_ADDR},addr.port=10809",
              "--export", "nbd,id=e,node-name=f,name=img,writable=on", netns=server_ns)
    mp = fuse_dir / "b.fuse"
    b = client(start_qsd, mp, f"server.type=inet,server.host={SERVER_ADDR},"
               "server.port=10809,server.keep-alive=on", options, netns=client_ns)
    return b, mp


def test_link_cut_with_reconnect_delay(fuse_dir: Path, start_qsd: QsdFactory,
                                       hosts: tuple[str, str]) -> None:
    b, mp = served(fuse_dir, start_qsd, hosts, ",reconnect-delay=20")
    client_ns = hosts[1]
    before = connections(client_ns)
    assert len(before) == 1
    load = subprocess.Popen(fio(mp, *VERIFY, "--size=32M", "--rate_iops=2000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        link(client_ns, "down")
        time.sleep(4)        # longer than the client's TCP gives an unanswered connection
        link(client_ns, "up")
        out, err = load.communicate(timeout=90)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, (out, err)
    after = connections(client_ns)
    assert len(after) == 1 and after != before      # it reconnected
    assert qmp(b, "query-block-exports")["return"] != []


def test_link_cut_without_reconnect_delay(fuse_dir: Path, start_qsd: QsdFactory,
                                          hosts: tuple[str, str]) -> None:
    b, mp = served(fuse_dir, start_qsd, hosts)
    client_ns = hosts[1]
    load = subprocess.Popen(fio(mp, *VERIFY, "--size=32M", "--rate_iops=2000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        link(client_ns, "down")
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode != 0 and "Input/output error" in out + err
    # Nothing else broke: QMP answers, and once the link is back the node reconnects.
    assert qmp(b, "query-named-block-nodes")["return"] != []
    link(client_ns, "up")
    deadline = time.monotonic() + 40
    while True:
        result = run("dd", f"if={mp}", "of=/dev/null", "bs=4k", "count=16", "iflag=direct")
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stderr


# ---- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs() -> Iterator[dict[str, Path]]:
    root = Path(tempfile.mkdtemp(prefix="qsd-nbdc-certs-"))
    try:
        yield make_credentials(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_tls(fuse_dir: Path, start_qsd: QsdFactory, certs: dict[str, Path]) -> None:
    """x509 credentials at both ends; the refusals in 11.1.3's words (recorded from its
    daemon as the client of this server)."""
    image = fuse_dir / "a.raw"
    image.write_bytes(b"")
    os.truncate(image, 32 * MiB)
    sock = fuse_dir / "a.sock"
    start_qsd("--object", f"tls-creds-x509,id=s,endpoint=server,dir={certs['server']}",
              "--blockdev", f"file,node-name=f,filename={image}",
              "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=s",
              "--export", "nbd,id=e,node-name=f,name=img,writable=on")
    mp = fuse_dir / "b.fuse"
    b = client(start_qsd, mp, f"server.type=unix,server.path={sock}",
               ",tls-creds=c,tls-hostname=localhost",
               "--object", f"tls-creds-x509,id=c,endpoint=client,dir={certs['client']}")
    check(*fio(mp, *VERIFY, "--size=4M"), timeout=120)
    unix = {"type": "unix", "path": str(sock)}
    refusals = [
        ({}, "TLS negotiation required before option 7 (go)"),
        ({"tls-creds": "c"}, "No hostname for certificate validation"),
        ({"tls-creds": "c", "tls-hostname": "otherhost"},
         "Certificate does not match the hostname otherhost"),
    ]
    for options, text in refusals:
        reply = qmp(b, "blockdev-add", driver="nbd", **{"node-name": "r"}, server=unix,
                    export="img", **options)
        assert reply == {"error": {"class": "GenericError", "desc": text}}


@pytest.mark.skipif(not hasattr(ssl.SSLContext, "set_psk_client_callback"),
                    reason="Python's ssl has PSK client callbacks from 3.13 on")
def test_tls_psk(fuse_dir: Path, start_qsd: QsdFactory, certs: dict[str, Path]) -> None:
    """tls-creds-psk at both ends: user alice's key, and a key the server does not have."""
    image = fuse_dir / "a.raw"
    image.write_bytes(b"")
    os.truncate(image, 32 * MiB)
    sock = fuse_dir / "a.sock"
    start_qsd("--object", f"tls-creds-psk,id=s,endpoint=server,dir={certs['psk']}",
              "--blockdev", f"file,node-name=f,filename={image}",
              "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=s",
              "--export", "nbd,id=e,node-name=f,name=img,writable=on")
    mp = fuse_dir / "b.fuse"
    b = client(start_qsd, mp, f"server.type=unix,server.path={sock}", ",tls-creds=c",
               "--object", f"tls-creds-psk,id=c,endpoint=client,dir={certs['psk']},"
               "username=alice",
               "--object", f"tls-creds-psk,id=w,endpoint=client,dir={certs['pskwrong']}")
    check(*fio(mp, *VERIFY, "--size=4M"), timeout=120)
    reply = qmp(b, "blockdev-add", driver="nbd", **{"node-name": "r"},
                server={"type": "unix", "path": str(sock)}, export="img", **{"tls-creds": "w"})
    assert "error" in reply


# ---- the server goes away and comes back ---------------------------------------------------


def test_server_restart(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    """open-timeout waits for a server that is not there yet; with reconnect-delay,
    requests wait that long for a server that went away, then fail with EIO; once the
    server is back the node reconnects by itself."""
    image = fuse_dir / "a.raw"
    image.write_bytes(os.urandom(MiB))
    sock = fuse_dir / "a.sock"

    def server() -> Qsd:
        daemon = start_qsd("--blockdev", f"file,node-name=f,filename={image}",
                           "--nbd-server", f"addr.type=unix,addr.path={sock}",
                           "--export", "nbd,id=e,node-name=f,name=img,writable=on")
        assert qmp(daemon, "query-block-exports")["return"] != []
        return daemon

    b = start_qsd()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        adding = pool.submit(qmp, b, "blockdev-add", driver="nbd", **{"node-name": "n"},
                             server={"type": "unix", "path": str(sock)}, export="img",
                             **{"reconnect-delay": 1, "open-timeout": 10})
        time.sleep(1.5)
        assert not adding.done()
        a = server()
        assert adding.result(timeout=30) == {"return": {}}
    mp = fuse_dir / "b.fuse"
    mp.touch()
    assert qmp(b, "block-export-add", type="fuse", id="x", **{"node-name": "n"},
               mountpoint=str(mp)) == {"return": {}}
    with open(mp, "rb") as f:
        assert f.read(MiB) == image.read_bytes()
    a.stop()
    start = time.monotonic()
    result = run("dd", f"if={mp}", "of=/dev/null", "bs=4k", "count=1", "skip=100",
                 "iflag=direct")
    waited = time.monotonic() - start
    assert result.returncode != 0 and "Input/output error" in result.stderr
    assert 0.8 <= waited < 15, waited
    server()
    deadline = time.monotonic() + 40
    while run("dd", f"if={mp}", "of=/dev/null", "bs=4k", "count=1", "skip=200",
              "iflag=direct").returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert qmp(b, "blockdev-del", **{"node-name": "n"})["error"]  # in use by the export


def test_allocation_depth_against_qemu(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    """x-dirty-bitmap=qemu:allocation-depth from QEMU 11.1.3's server (a qcow2 overlay:
    data in the base, data in the top, unallocated): served again by qsd, it maps as
    11.1.3's own client maps it (recorded)."""
    have_sid_chroot()
    base, top = fuse_dir / "base.qcow2", fuse_dir / "top.qcow2"
    check("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    check("qemu-io", "-c", "write -P 1 0 1M", base)
    check("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    check("qemu-io", "-c", "write -P 2 2M 1M", top)
    sock_a, sock_b = fuse_dir / "a.sock", fuse_dir / "b.sock"
    with qemu_daemon(sock_a, "--blockdev",
                     f"qcow2,node-name=q,file.driver=file,file.filename={top}",
                     "--nbd-server", f"addr.type=unix,addr.path={sock_a}",
                     "--export", "nbd,id=e,node-name=q,name=img,allocation-depth=on"):
        b = start_qsd("--blockdev", f"nbd,node-name=n,server.type=unix,server.path={sock_a},"
                      "export=img,x-dirty-bitmap=qemu:allocation-depth,read-only=on",
                      "--nbd-server", f"addr.type=unix,addr.path={sock_b}",
                      "--export", "nbd,id=e,node-name=n,name=img")
        assert qmp(b, "query-block-exports")["return"] != []
        extents = json.loads(check("qemu-img", "map", "--output=json", "-f", "raw",
                                   f"nbd+unix:///img?socket={sock_b}"))
    assert [(e["start"], e["length"], e["present"], e["zero"], e["data"])
            for e in extents] == [(0, MiB, True, True, True),
                                  (MiB, MiB, True, False, True),
                                  (2 * MiB, MiB, False, False, False),
                                  (3 * MiB, MiB, True, False, True)]
