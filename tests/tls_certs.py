"""Test credentials made with the openssl tool: a CA, a server and a client certificate
in the directory layouts QEMU expects, plus the wrong ones a refused client uses."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

SERVER_EXT = ("basicConstraints=critical,CA:FALSE\n"
              "keyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
CLIENT_EXT = ("basicConstraints=critical,CA:FALSE\n"
              "keyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=clientAuth\n")
CLIENT_DN = "C=GB,O=qsd,CN=client1"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(work: Path, name: str) -> tuple[Path, Path]:
    key, cert = work / f"{name}-key.pem", work / f"{name}-cert.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _leaf(work: Path, name: str, subject: str, ca: tuple[Path, Path], ext: str) -> None:
    ext_file = work / f"{name}.ext"
    ext_file.write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(work / f"{name}-key.pem"),
             "-out", str(work / f"{name}.csr"), "-subj", subject)
    _openssl("x509", "-req", "-in", str(work / f"{name}.csr"), "-CA", str(ca[1]),
             "-CAkey", str(ca[0]), "-CAcreateserial", "-out", str(work / f"{name}-cert.pem"),
             "-days", "2", "-extfile", str(ext_file))


def make_credentials(root: Path) -> dict[str, Path]:
    """Directories: server, client, nocert (CA only), wrongca (client trusting another
    CA), psk (keys.psk with users qemu and alice), pskwrong (qemu with another key)."""
    work = root / "work"
    work.mkdir(parents=True)
    ca = _ca(work, "ca")
    other = _ca(work, "other")
    _leaf(work, "server", "/O=qsd/CN=localhost", ca, SERVER_EXT)
    _leaf(work, "client", "/C=GB/O=qsd/CN=client1", ca, CLIENT_EXT)
    dirs = {name: root / name for name in
            ("server", "client", "nocert", "wrongca", "psk", "pskwrong")}
    for path in dirs.values():
        path.mkdir()
    for name in ("server-cert.pem", "server-key.pem"):
        shutil.copy(work / name, dirs["server"] / name)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(work / name, dirs["client"] / name)
        shutil.copy(work / name, dirs["wrongca"] / name)
    for name in ("server", "client", "nocert"):
        shutil.copy(ca[1], dirs[name] / "ca-cert.pem")
    shutil.copy(other[1], dirs["wrongca"] / "ca-cert.pem")
    (dirs["psk"] / "keys.psk").write_text(
        f"qemu:{secrets.token_hex(32)}\nalice:{secrets.token_hex(32)}\n")
    (dirs["pskwrong"] / "keys.psk").write_text(f"qemu:{secrets.token_hex(32)}\n")
    dirs["work"] = work
    return dirs
