"""NBD over TLS with QEMU's own clients, and the secret/TLS/authz objects' QMP texts.

The expected texts were recorded from QEMU 11.1.3's daemon and clients on the same
credentials: what a refused client prints, what the daemon reports, what object-add says.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qsd.crypto.engine import SslObjectEngine, TlsClosed
from qsd.crypto.secret import base64_decode
from qsd.errors import QMPError
from tests.harness import Qsd, wait_for_path
from tests.test_nbd_daemon import Monitor
from tests.tls_certs import CLIENT_DN, make_credentials

PATTERN = bytes(range(256)) * 16


@pytest.fixture(scope="module")
def creds() -> Iterator[dict[str, Path]]:
    root = Path(tempfile.mkdtemp(prefix="qsd-tls-", dir="/tmp"))
    try:
        yield make_credentials(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-tls-", dir="/tmp"))
    try:
        image = path / "disk.raw"
        with open(image, "wb") as f:
            f.truncate(1 << 20)
            f.write(PATTERN)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class TlsDaemon:
    def __init__(self, workdir: Path, objects: list[str], server_opts: str,
                 env: dict[str, str] | None = None) -> None:
        self.sock = workdir / "nbd.sock"
        args: list[str] = []
        for obj in objects:
            args += ["--object", obj]
        args += ["--blockdev", f"file,node-name=file0,filename={workdir / 'disk.raw'}",
                 "--nbd-server", f"addr.type=unix,addr.path={self.sock},{server_opts}",
                 "--export", "nbd,id=e0,node-name=file0,name=exp"]
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            self.qsd = Qsd(workdir, args)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        wait_for_path(self.sock, self.qsd.proc)

    def stderr(self) -> str:
        self.qsd.stop()
        return self.qsd.stderr.decode()


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def img_opts(sock: Path, extra: str = "") -> str:
    return f"driver=nbd,path={sock},export=exp,tls-creds=tls0{extra}"


def qemu_img_info(sock: Path, creds_obj: str, extra: str = "") -> subprocess.CompletedProcess[str]:
    return run("qemu-img", "info", "--object", creds_obj, "--image-opts",
               img_opts(sock, extra))


def x509_client(directory: Path) -> str:
    return f"tls-creds-x509,id=tls0,dir={directory},endpoint=client"


def psk_client(directory: Path, user: str = "qemu") -> str:
    return f"tls-creds-psk,id=tls0,dir={directory},endpoint=client,username={user}"


def check_reads(sock: Path, creds_obj: str, extra: str, nbdinfo_uri: str) -> None:
    info = qemu_img_info(sock, creds_obj, extra)
    assert info.returncode == 0, info.stderr
    assert "virtual size: 1 MiB (1048576 bytes)" in info.stdout
    qio = run("qemu-io", "-r", "--object", creds_obj, "--image-opts", img_opts(sock, extra),
              "-c", "read -P 0x07 0x107 1", "-c", "read -P 0xff 0xfff 1",
              "-c", "read -P 0 0x100000 0", "-c", "read -P 0 4096 4096")
    assert qio.returncode == 0, qio.stdout + qio.stderr
    assert "Pattern verification failed" not in qio.stdout + qio.stderr
    assert qio.stdout.count("read 1/1 bytes") == 2
    nbdinfo = run("nbdinfo", "--size", nbdinfo_uri)
    assert nbdinfo.returncode == 0, nbdinfo.stderr
    assert nbdinfo.stdout.strip() == "1048576"


def test_x509_clients_read(creds: dict[str, Path], workdir: Path) -> None:
    daemon = TlsDaemon(workdir, [f"tls-creds-x509,id=t0,dir={creds['server']},endpoint=server"],
                       "tls-creds=t0")
    check_reads(daemon.sock, x509_client(creds["client"]), ",tls-hostname=localhost",
                f"nbds+unix:///exp?socket={daemon.sock}&tls-certificates={creds['client']}")
    assert "negotiation failed" not in daemon.stderr()


def test_data_before_close_notify_is_read(creds: dict[str, Path]) -> None:
    """A client's last message and its close_notify often arrive in one recv (libnbd 1.24
    sends NBD_OPT_ABORT and closes at once): the message is read, then the end."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds["server"] / "server-cert.pem",
                               creds["server"] / "server-key.pem")
    client_ctx = ssl.create_default_context(cafile=str(creds["client"] / "ca-cert.pem"))
    server = SslObjectEngine(server_ctx)
    to_client, to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname="localhost")
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            server.feed(to_server.read())
            server.do_handshake()
            to_client.write(server.take_output())
    server.feed(to_server.read())
    assert server.do_handshake()
    to_client.write(server.take_output())
    client.write(b"last words")
    try:
        client.unwrap()
    except ssl.SSLWantReadError:
        pass  # the close_notify is sent; the server's answer is not awaited
    server.feed(to_server.read())
    received = b""
    with pytest.raises(TlsClosed):
        while True:
            received += server.read()
    assert received == b"last words"


PSK_ENGINES = ["libssl"] + (["stdlib"] if sys.version_info >= (3, 13) else [])


@pytest.mark.parametrize("engine", PSK_ENGINES)
def test_psk_clients_read(creds: dict[str, Path], workdir: Path, engine: str) -> None:
    daemon = TlsDaemon(workdir, [f"tls-creds-psk,id=t0,dir={creds['psk']},endpoint=server"],
                       "tls-creds=t0", env={"QSD_PSK_ENGINE": engine})
    check_reads(daemon.sock, psk_client(creds["psk"]), "",
                f"nbds+unix://qemu@/exp?socket={daemon.sock}&tls-psk-file={creds['psk']}/keys.psk")
    alice = qemu_img_info(daemon.sock, psk_client(creds["psk"], "alice"))
    assert alice.returncode == 0, alice.stderr
    wrong = qemu_img_info(daemon.sock, psk_client(creds["pskwrong"]))
    assert wrong.returncode == 1
    assert wrong.stderr.strip().endswith(
        "TLS handshake failed: The TLS connection was non-properly terminated.")
    assert "option negotiation failed: TLS handshake failed:" in daemon.stderr()


def test_refused_clients(creds: dict[str, Path], workdir: Path) -> None:
    daemon = TlsDaemon(workdir, [f"tls-creds-x509,id=t0,dir={creds['server']},endpoint=server"],
                       "tls-creds=t0")
    plain = run("qemu-img", "info", f"nbd+unix:///exp?socket={daemon.sock}")
    assert plain.returncode == 1
    assert plain.stderr.splitlines()[1:] == [
        "Did you forget a valid tls-creds?",
        "server reported: Option 0x7 not permitted before TLS"]
    listing = run("qemu-nbd", "-L", "-k", str(daemon.sock))
    assert "server reported: Option 0x3 not permitted before TLS" in listing.stderr
    wrong_ca = qemu_img_info(daemon.sock, x509_client(creds["wrongca"]) + ",sanity-check=off",
                             ",tls-hostname=localhost")
    assert wrong_ca.returncode == 1
    assert wrong_ca.stderr.strip().endswith(": The certificate hasn't got a known issuer")
    no_cert = qemu_img_info(daemon.sock, x509_client(creds["nocert"]),
                            ",tls-hostname=localhost")
    assert no_cert.returncode == 1
    assert "Failed to read option reply" in no_cert.stderr
    assert "qsd: option negotiation failed: Verify failed: No certificate was found." \
        in daemon.stderr().splitlines()


def test_tls_authz(creds: dict[str, Path], workdir: Path) -> None:
    daemon = TlsDaemon(workdir, [
        f"tls-creds-x509,id=t0,dir={creds['server']},endpoint=server",
        "authz-simple,id=az0,identity=CN=someone-else"], "tls-creds=t0,tls-authz=az0")
    monitor = Monitor(daemon.qsd)
    client, extra = x509_client(creds["client"]), ",tls-hostname=localhost"
    refused = qemu_img_info(daemon.sock, client, extra)
    assert refused.returncode == 1
    assert "Failed to read option reply" in refused.stderr
    # QEMU looks the authz object up per connection, so replacing it takes effect at once.
    monitor.ok("object-del", id="az0")
    missing = qemu_img_info(daemon.sock, client, extra)
    assert missing.returncode == 1
    monitor.ok("object-add", **{"qom-type": "authz-list", "id": "az0", "policy": "deny",
                                "rules": [{"match": "*CN=client?", "policy": "allow",
                                           "format": "glob"}]})
    assert qemu_img_info(daemon.sock, client, extra).returncode == 0
    monitor.ok("object-del", id="az0")
    rules = workdir / "rules.json"
    rules.write_text(json.dumps({"policy": "deny",
                                 "rules": [{"match": CLIENT_DN, "policy": "allow"}]}))
    monitor.ok("object-add", **{"qom-type": "authz-listfile", "id": "az0",
                                "filename": str(rules)})
    assert qemu_img_info(daemon.sock, client, extra).returncode == 0
    time.sleep(0.01)
    rules.write_text('{"policy": "deny"}')
    assert qemu_img_info(daemon.sock, client, extra).returncode == 1
    lines = daemon.stderr().splitlines()
    assert lines.count(f"qsd: option negotiation failed: TLS x509 authz check for "
                       f"{CLIENT_DN} is denied") == 2
    assert "qsd: option negotiation failed: Cannot find QAuthZ object ID az0" in lines


def test_object_errors(creds: dict[str, Path], workdir: Path) -> None:
    """object-add texts of QEMU 11.1.3 for the same arguments."""
    qsd = Qsd(workdir, ["--object", "iothread,id=io0"])
    try:
        mon = Monitor(qsd)
        server, client, psk = creds["server"], creds["client"], creds["psk"]
        cases: list[tuple[dict[str, object], str]] = [
            ({"qom-type": "secret", "id": "s1"}, "Either 'file' or 'data' must be provided"),
            ({"qom-type": "secret", "id": "s1", "data": "x", "file": "/nonexistent"},
             "'file' and 'data' are mutually exclusive"),
            ({"qom-type": "secret", "id": "s1", "file": "/nonexistent/x"},
             "Unable to read /nonexistent/x: Failed to open file \u201c/nonexistent/x\u201d: "
             "No such file or directory"),
            ({"qom-type": "secret", "id": "s1", "data": "!!!", "format": "base64"},
             "Base64 data contains invalid characters"),
            ({"qom-type": "secret", "id": "s1", "data": "x", "format": "hex"},
             "Parameter 'format' does not accept value 'hex'"),
            ({"qom-type": "secret", "id": "s1", "data": "x", "keyid": "nosuch"},
             "No secret with id 'nosuch'"),
            ({"qom-type": "secret", "id": "s1", "data": "x", "keyid": "io0"},
             "Object with id 'io0' is not a secret"),
            ({"qom-type": "secret", "id": "s1", "data": "x", "loaded": True},
             "Parameter 'loaded' is unexpected"),
            ({"qom-type": "secret", "id": "9x", "data": "x"},
             "Parameter 'id' expects an identifier"),
            ({"qom-type": "tls-creds-x509", "id": "t1", "endpoint": "server"},
             "Missing 'dir' property value"),
            ({"qom-type": "tls-creds-x509", "id": "t1", "dir": "/nonexistent",
              "endpoint": "server"},
             "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"),
            ({"qom-type": "tls-creds-x509", "id": "t1", "dir": str(client), "endpoint": "server"},
             f"Missing server cert '{client}/server-cert.pem' & key '{client}/server-key.pem'"),
            ({"qom-type": "tls-creds-x509", "id": "t1", "dir": str(server), "endpoint": "bogus"},
             "Parameter 'endpoint' does not accept value 'bogus'"),
            ({"qom-type": "tls-creds-x509", "id": "t1", "dir": str(server), "bogus": 1},
             "Parameter 'bogus' is unexpected"),
            ({"qom-type": "tls-creds-x509", "id": "t1", "dir": str(server), "endpoint": "server",
              "passwordid": "nosuch"}, "No secret with id 'nosuch'"),
            ({"qom-type": "tls-creds-x509", "id": "t1", "dir": str(creds["wrongca"]),
              "endpoint": "client"}, f"Cert '{CLIENT_DN}' has no issuer in CA chain"),
            ({"qom-type": "tls-creds-psk", "id": "p1", "dir": str(server), "endpoint": "server"},
             f"Unable to access credentials {server}/keys.psk: No such file or directory"),
            ({"qom-type": "tls-creds-psk", "id": "p1", "dir": str(psk), "endpoint": "server",
              "username": "bob"}, "username should not be set when endpoint=server"),
            ({"qom-type": "tls-creds-psk", "id": "p1", "dir": str(psk), "endpoint": "client",
              "username": "bob"}, f"Username bob not found in PSK file {psk}/keys.psk"),
            ({"qom-type": "authz-simple", "id": "a1"}, "Parameter 'identity' is missing"),
            ({"qom-type": "authz-list", "id": "a1", "policy": "bogus"},
             "Parameter 'policy' does not accept value 'bogus'"),
            ({"qom-type": "authz-list", "id": "a1", "rules": [{"policy": "allow"}]},
             "Parameter 'rules[0].match' is missing"),
            ({"qom-type": "authz-listfile", "id": "a1"}, "Parameter 'filename' is missing"),
        ]
        for arguments, desc in cases:
            assert mon.err("object-add", **arguments) == desc, arguments
        mon.ok("object-add", **{"qom-type": "tls-creds-x509", "id": "tc", "dir": str(client)})
        mon.ok("object-add", **{"qom-type": "secret", "id": "s0", "data": "x"})
        addr = {"type": "unix", "data": {"path": str(workdir / "n.sock")}}
        assert mon.err("nbd-server-start", addr=addr, **{"tls-creds": "s0"}) == \
            "Object with id 's0' is not TLS credentials"
        assert mon.err("nbd-server-start", addr=addr, **{"tls-creds": "tc"}) == \
            "Expected TLS credentials for a server endpoint"
        assert mon.err("nbd-server-start", addr=addr, **{"tls-creds": "nosuch"}) == \
            "No TLS credentials with id 'nosuch'"
        assert mon.err("object-add", **{"qom-type": "secret", "id": "tc", "data": "x"}) == \
            "attempt to add duplicate property 'tc' to object (type 'container')"
        mon.ok("object-del", id="tc")
        assert mon.err("object-del", id="tc") == "object 'tc' not found"
    finally:
        qsd.stop()


def test_secret_formats_and_encryption(creds: dict[str, Path], workdir: Path) -> None:
    """A passworded server key whose password is an AES-256-CBC secret, decrypted with a
    base64 master key from a file; the error texts are 11.1.3's."""
    master = os.urandom(32)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(b"hunter2") + padder.finalize()
    enc = Cipher(algorithms.AES256(master), modes.CBC(iv)).encryptor()
    ciphertext = enc.update(plain) + enc.finalize()
    keyfile = workdir / "master.b64"
    keyfile.write_bytes(base64.b64encode(master))
    server = workdir / "encserver"
    server.mkdir()
    shutil.copy(creds["server"] / "ca-cert.pem", server)
    shutil.copy(creds["server"] / "server-cert.pem", server)
    subprocess.run(["openssl", "pkey", "-in", str(creds["server"] / "server-key.pem"),
                    "-aes256", "-passout", "pass:hunter2",
                    "-out", str(server / "server-key.pem")], check=True, timeout=60)
    secret = (f"secret,id=pw,data={base64.b64encode(ciphertext).decode()},keyid=master,"
              f"iv={base64.b64encode(iv).decode()},format=base64")
    daemon = TlsDaemon(workdir, [
        f"secret,id=master,file={keyfile},format=base64", secret,
        f"tls-creds-x509,id=t0,dir={server},endpoint=server,passwordid=pw"], "tls-creds=t0")
    info = qemu_img_info(daemon.sock, x509_client(creds["client"]), ",tls-hostname=localhost")
    assert info.returncode == 0, info.stderr
    mon = Monitor(daemon.qsd)
    ivb64 = base64.b64encode(iv).decode()
    mon.ok("object-add", **{"qom-type": "secret", "id": "raw", "data": "hunter2"})
    cases: list[tuple[dict[str, object], str]] = [
        ({"keyid": "master"}, "IV is required to decrypt secret"),
        ({"keyid": "raw", "iv": ivb64}, "Key should be 32 bytes in length"),
        ({"keyid": "master", "iv": "AAAA"}, "IV should be 16 bytes in length not 3"),
        ({"keyid": "master", "iv": "!!"}, "Base64 data contains invalid characters"),
        ({"keyid": "master", "iv": ivb64, "data": "AAAAAAAAAAAAAAAAAAAAAA=="},
         "Length 24 must be a multiple of block size 16"),
    ]
    for extra, desc in cases:
        arguments: dict[str, object] = {"qom-type": "secret", "id": "x", "data": "AAAA"}
        arguments.update(extra)
        assert mon.err("object-add", **arguments) == desc, extra
    bad_pw = {"qom-type": "tls-creds-x509", "id": "t1", "dir": str(server),
              "endpoint": "server", "passwordid": "raw"}
    mon.ok("object-del", id="raw")
    mon.ok("object-add", **{"qom-type": "secret", "id": "raw", "data": "wrong"})
    assert mon.err("object-add", **bad_pw) == \
        f"Unable to import private key {server}/server-key.pem"
    daemon.stderr()


@pytest.mark.parametrize(("text", "value"), [
    (b"c2VjcmV0", b"secret"), (b"abc", b""), (b"a=bc", base64_decode(b"a=bc")),
    (b"YWJj\nZGVm", b"abcdef"), (b"YWJjZA", b"abc"), (b"", b"")])
def test_base64_like_qemu(text: bytes, value: bytes) -> None:
    """Inputs 11.1.3 accepts (GLib decodes leniently); the values are GLib's."""
    assert base64_decode(text) == value


def test_base64_refuses_what_qemu_refuses() -> None:
    with pytest.raises(QMPError, match="invalid characters"):
        base64_decode(b"ab!c")
