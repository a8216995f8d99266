"""``secret`` objects: a password or key, given inline or in a file, optionally in base64
and optionally AES-256-CBC encrypted with another secret (QEMU's ``crypto/secret*.c``).

Every consumer looks secrets up by id when it needs the value, as QEMU does, so a secret
can be replaced (deleted and added again) between two uses.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qsd.errors import QMPError
from qsd.qapi.generated import QCryptoSecretFormat
from qsd.qom.model import Property, QOMObject, read_enum, read_string, store

_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_VALID = frozenset(_BASE64_ALPHABET + b"=\n")
_RANK = {c: i for i, c in enumerate(_BASE64_ALPHABET)} | {ord("="): 0}


def base64_decode(text: bytes) -> bytes:
    """QEMU's qbase64_decode(): only the alphabet, '=' and newlines are allowed, and
    decoding is GLib's, which takes '=' as a zero digit (dropping the output bytes it
    stands for at the end of a quantum) and ignores a trailing partial quantum."""
    if b"\0" in text:
        raise QMPError("Base64 data contains embedded NUL characters")
    if not _BASE64_VALID.issuperset(text):
        raise QMPError("Base64 data contains invalid characters")
    out = bytearray()
    value = count = 0
    last = [0, 0]
    for char in text:
        rank = _RANK.get(char)
        if rank is None:
            continue
        last = [char, last[0]]
        value = (value << 6) | rank
        count += 1
        if count == 4:
            out.append((value >> 16) & 0xFF)
            if last[1] != ord("="):
                out.append((value >> 8) & 0xFF)
            if last[0] != ord("="):
                out.append(value & 0xFF)
            value = count = 0
    return bytes(out)


_SECRET_COMMON_PROPERTIES = (
    Property("format", "QCryptoSecretFormat", get=read_enum("format"), set=store("format")),
    Property("keyid", "str", get=read_string("keyid"), set=store("keyid")),
    Property("iv", "str", get=read_string("iv"), set=store("iv")),
)


class SecretCommon(QOMObject, qom_type="secret_common", abstract=True,
                   interfaces=("user-creatable",), properties=_SECRET_COMMON_PROPERTIES):
    """What every kind of secret has: how its stored form is encoded and encrypted.
    The value is loaded once, on completion; later property changes do not reload it
    (as in QEMU)."""

    def __init__(self) -> None:
        self.format = QCryptoSecretFormat.raw
        self.keyid: str | None = None
        self.iv: str | None = None
        self.value = b""

    def load_raw(self) -> bytes:
        """The stored form of the secret."""
        raise NotImplementedError

    def complete(self) -> None:
        raw = self.load_raw()
        base64 = self.format == QCryptoSecretFormat.base64
        if self.keyid is not None:
            assert self.qom_parent is not None
            self.value = _decrypt(raw, lookup_secret(self.qom_parent, self.keyid), self.iv,
                                  base64)
        elif base64:
            self.value = base64_decode(raw)
        else:
            self.value = raw


_SECRET_PROPERTIES = (
    Property("data", "str", get=read_string("data"), set=store("data")),
    Property("file", "str", get=read_string("file"), set=store("file")),
)


class Secret(SecretCommon, qom_type="secret", properties=_SECRET_PROPERTIES):
    """``--object secret,id=...,data=...`` or ``file=...``."""

    def __init__(self) -> None:
        super().__init__()
        self.data: str | None = None
        self.file: str | None = None

    def load_raw(self) -> bytes:
        if self.data is not None and self.file is not None:
            raise QMPError("'file' and 'data' are mutually exclusive")
        if self.data is not None:
            return self.data.encode()
        if self.file is not None:
            return _read_file(self.file)
        raise QMPError("Either 'file' or 'data' must be provided")


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise QMPError(f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                       f"{exc.strerror}") from None


def _decrypt(data: bytes, key: bytes, iv_text: str | None, base64: bool) -> bytes:
    if len(key) != 32:
        raise QMPError("Key should be 32 bytes in length")
    if iv_text is None:
        raise QMPError("IV is required to decrypt secret")
    iv = base64_decode(iv_text.encode())
    if len(iv) != 16:
        raise QMPError(f"IV should be 16 bytes in length not {len(iv)}")
    ciphertext = base64_decode(data) if base64 else data
    if len(ciphertext) % 16:
        raise QMPError(f"Length {len(ciphertext)} must be a multiple of block size 16")
    decryptor = Cipher(algorithms.AES256(key), modes.CBC(iv)).decryptor()
    plain = decryptor.update(ciphertext) + decryptor.finalize()
    if not plain:
        return plain
    pad = plain[-1]
    if pad > 16 or pad > len(plain):
        raise QMPError(f"Incorrect number of padding bytes ({pad}) found on decrypted data")
    return plain[:len(plain) - pad]


def lookup_secret(objects: Mapping[str, object], secret_id: str) -> bytes:
    """QEMU's qcrypto_secret_lookup()."""
    obj = objects.get(secret_id)
    if obj is None:
        raise QMPError(f"No secret with id '{secret_id}'")
    if not isinstance(obj, SecretCommon):
        raise QMPError(f"Object with id '{secret_id}' is not a secret")
    return obj.value


def lookup_secret_utf8(objects: Mapping[str, object], secret_id: str) -> str:
    """QEMU's qcrypto_secret_lookup_as_utf8(): passwords must be valid UTF-8."""
    value = lookup_secret(objects, secret_id)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise QMPError(f"Data from secret {secret_id} is not valid UTF-8") from None
