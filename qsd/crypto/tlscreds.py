"""tls-creds-x509 and tls-creds-psk objects (QEMU's ``crypto/tlscreds*.c``).

The files are read and checked when the object is created, with QEMU's file names and
texts. A server-side credentials object then makes one ``TlsEngine`` per connection:
Python's ``ssl`` for x509, and for PSK ``ssl`` where it has PSK callbacks (3.13 on) or
the small libssl binding in ``psk_libssl`` before that.
"""

from __future__ import annotations

import datetime
import os
import ssl
import sys
from collections.abc import Mapping
from operator import attrgetter

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from qsd.crypto.engine import (
    PSK_CIPHERS,
    SslObjectEngine,
    TlsEngine,
    Versions,
    stdlib_psk_engine,
)
from qsd.crypto.secret import lookup_secret_utf8
from qsd.errors import QMPError
from qsd.qapi.generated import QCryptoTLSCredsEndpoint
from qsd.qom.model import Property, QOMObject, read_enum, read_string, store

_PEM = Encoding.PEM
_IDENTITY_MAX = 16  # server-cert-N.pem / client-cert-N.pem, as QEMU numbers them


def dn_string(name: x509.Name) -> str:
    """A distinguished name the way GnuTLS prints it for QEMU: RDNs in certificate
    order, e.g. ``C=GB,O=qsd,CN=client1`` (what tls-authz identities are matched on)."""
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns)


_TLS_CREDS_PROPERTIES = (
    Property("verify-peer", "bool", get=attrgetter("verify_peer"), set=store("verify_peer")),
    Property("dir", "str", get=read_string("dir"), set=store("dir")),
    Property("endpoint", "QCryptoTLSCredsEndpoint", get=read_enum("endpoint"),
             set=store("endpoint")),
    Property("priority", "str", get=read_string("priority"), set=store("priority")),
)


class TlsCreds(QOMObject, qom_type="tls-creds", abstract=True, properties=_TLS_CREDS_PROPERTIES):
    """What every TLS credentials object has (QEMU's TYPE_QCRYPTO_TLS_CREDS).

    The files are read on completion; changing ``dir`` later does not reload them, while
    ``endpoint`` and ``verify-peer`` are read where they are used (as in QEMU)."""

    def __init__(self) -> None:
        self.verify_peer = True
        self.dir: str | None = None
        self.endpoint = QCryptoTLSCredsEndpoint.client
        self.priority: str | None = None

    @property
    def is_server(self) -> bool:
        return self.endpoint == QCryptoTLSCredsEndpoint.server

    def _path(self, name: str, required: bool) -> str | None:
        """QEMU's qcrypto_tls_creds_get_path(): None for a missing optional file."""
        if self.dir is None:
            raise QMPError("Missing 'dir' property value")
        path = f"{self.dir}/{name}"
        try:
            os.close(os.open(path, os.O_RDONLY))
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not required:
                return None
            raise QMPError(f"Unable to access credentials {path}: {exc.strerror}") from None
        return path

    def new_server_engine(self) -> TlsEngine:
        raise NotImplementedError

    def client_context(self) -> ssl.SSLContext:
        """What a client endpoint's sessions (the NBD client's) are made from."""
        raise NotImplementedError

    def tls_versions(self) -> Versions:
        """The TLS version tokens of a GnuTLS priority string (``-VERS-TLS1.3``,
        ``-VERS-ALL:+VERS-TLS1.2``); the rest of its syntax has no OpenSSL equivalent."""
        if not self.priority:
            return None
        names = {"VERS-TLS1.2": {ssl.TLSVersion.TLSv1_2}, "VERS-TLS1.3": {ssl.TLSVersion.TLSv1_3}}
        names["VERS-ALL"] = names["VERS-TLS1.2"] | names["VERS-TLS1.3"]
        versions = set(names["VERS-ALL"])
        for token in self.priority.split(":"):
            wanted = names.get(token[1:], set())
            if token.startswith("-"):
                versions -= wanted
            elif token.startswith("+"):
                versions |= wanted
        return (min(versions), max(versions)) if versions else None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise QMPError(f"Cannot load {what} {path}: Failed to open file \u201c{path}\u201d: "
                       f"{exc.strerror}") from None


def _load_certs(path: str) -> list[x509.Certificate]:
    data = _read(path, "CA cert list")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise QMPError(f"Unable to import certificate {path}: No certificate was found.")
    return certs


class _Identity:
    """One certificate chain and its key (server-cert.pem + server-key.pem)."""

    def __init__(self, cert_path: str, key_path: str, certs: list[x509.Certificate]) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.certs = certs


def find_tls_creds(objects: Mapping[str, object], creds_id: str, *, server: bool) -> TlsCreds:
    """The credentials a ``tls-creds`` option names, for a server or a client endpoint,
    with QEMU's texts for a missing id, another kind of object and the wrong endpoint."""
    creds = objects.get(creds_id)
    if creds is None:
        raise QMPError(f"No TLS credentials with id '{creds_id}'")
    if not isinstance(creds, TlsCreds):
        raise QMPError(f"Object with id '{creds_id}' is not TLS credentials")
    if creds.is_server != server:
        raise QMPError(f"Expected TLS credentials for a {'server' if server else 'client'} "
                       "endpoint")
    return creds


_X509_PROPERTIES = (
    Property("sanity-check", "bool", get=attrgetter("sanity_check"),
             set=store("sanity_check")),
    Property("passwordid", "str", get=read_string("passwordid"), set=store("passwordid")),
)


class TlsCredsX509(TlsCreds, qom_type="tls-creds-x509", interfaces=("user-creatable",),
                   properties=_X509_PROPERTIES):
    """``tls-creds-x509``: ca-cert.pem, server-cert.pem/server-key.pem (or the client
    pair), optional ca-crl.pem and dh-params.pem, in ``dir``."""

    def __init__(self) -> None:
        super().__init__()
        self.sanity_check = True
        self.passwordid: str | None = None

    def complete(self) -> None:
        assert self.qom_parent is not None
        objects = self.qom_parent
        if self.dir is None:
            raise QMPError("Missing 'dir' property value")
        ca_path = self._path("ca-cert.pem", True)
        assert ca_path is not None
        self.ca_path = ca_path
        self.ca_certs = _load_certs(ca_path)
        self.context = ssl.SSLContext(
            ssl.PROTOCOL_TLS_SERVER if self.is_server else ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.load_verify_locations(cadata="".join(
            c.public_bytes(_PEM).decode() for c in self.ca_certs))
        self.identities = self._load_identities(objects)
        crl = dh_params = None
        if self.is_server:
            crl = self._path("ca-crl.pem", False)
            dh_params = self._path("dh-params.pem", False)
        if self.sanity_check:
            for identity in self.identities:
                self._check_identity(identity)
        if crl is not None:
            try:
                self.context.load_verify_locations(cafile=crl)
            except ssl.SSLError as exc:
                raise QMPError(f"Cannot load CRL '{crl}': {exc.reason}") from None
            self.context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if dh_params is not None:
            self.context.load_dh_params(dh_params)
        self.context.verify_mode = (ssl.CERT_OPTIONAL if self.verify_peer
                                    else ssl.CERT_NONE)
        versions = self.tls_versions()
        if versions is not None:
            self.context.minimum_version, self.context.maximum_version = versions

    def _load_identities(self, objects: Mapping[str, object]) -> list[_Identity]:
        prefix = "server" if self.is_server else "client"
        names = [(f"{prefix}-cert.pem", f"{prefix}-key.pem")] + [
            (f"{prefix}-cert-{i}.pem", f"{prefix}-key-{i}.pem") for i in range(_IDENTITY_MAX)]
        identities = []
        for index, (cert_name, key_name) in enumerate(names):
            identity = self._load_identity(cert_name, key_name, objects)
            if identity is None:
                if index:
                    break
                continue
            identities.append(identity)
        if not identities and self.is_server:
            raise QMPError(f"Missing server cert '{self.dir}/server-cert.pem' & "
                           f"key '{self.dir}/server-key.pem'")
        return identities

    def _load_identity(self, cert_name: str, key_name: str,
                       objects: Mapping[str, object]) -> _Identity | None:
        cert_path = self._path(cert_name, False)
        key_path = self._path(key_name, False)
        if cert_path is None and key_path is None:
            return None
        if key_path is None:
            raise QMPError(f"Cert '{cert_path}' without corresponding key "
                           f"'{self.dir}/{key_name}'")
        if cert_path is None:
            raise QMPError(f"Key '{key_path}' without corresponding cert "
                           f"'{self.dir}/{cert_name}'")
        certs = _load_certs(cert_path)
        _read(key_path, "private key")
        password = None
        if self.passwordid is not None:
            password = lookup_secret_utf8(objects, self.passwordid)
        try:
            self.context.load_cert_chain(cert_path, key_path, password=password or "")
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise QMPError(f"Cannot set certificate '{cert_path}' & key '{key_path}': "
                               "The certificate and the given key do not match.") from None
            raise QMPError(f"Unable to import private key {key_path}") from None
        return _Identity(cert_path, key_path, certs)

    def _check_identity(self, identity: _Identity) -> None:
        for index, cert in enumerate(identity.certs):
            self._check_cert(cert, identity.cert_path, index != 0)
        self._check_chain(identity.certs)

    def _check_cert(self, cert: x509.Certificate, path: str, is_ca: bool) -> None:
        """QEMU's qcrypto_tls_creds_check_cert(): times, constraints, usage, purpose."""
        role = "CA" if is_ca else ("server" if self.is_server else "client")
        now = _now()
        if cert.not_valid_after_utc < now:
            raise QMPError(f"The {role} certificate {path} has expired")
        if cert.not_valid_before_utc > now:
            raise QMPError(f"The {role} certificate {path} is not yet active")
        try:
            is_ca_cert: bool | None = cert.extensions.get_extension_for_class(
                x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca_cert = None
        if is_ca_cert and not is_ca:
            raise QMPError(f"The certificate {path} basic constraints show a CA, but we "
                           f"need one for a {'server' if self.is_server else 'client'}")
        if is_ca and is_ca_cert is False:
            raise QMPError(f"The certificate {path} basic constraints do not show a CA")
        if is_ca and is_ca_cert is None:
            raise QMPError(f"The certificate {path} is missing basic constraints for a CA")
        try:
            ext = cert.extensions.get_extension_for_class(x509.KeyUsage)
        except x509.ExtensionNotFound:
            ext = None
        if ext is not None and ext.critical:
            usage = ext.value
            if is_ca and not usage.key_cert_sign:
                raise QMPError(f"Certificate {path} usage does not permit certificate signing")
            if not is_ca and not usage.digital_signature:
                raise QMPError(f"Certificate {path} usage does not permit digital signature")
            if not is_ca and not usage.key_encipherment:
                raise QMPError(f"Certificate {path} usage does not permit key encipherment")
        if not is_ca:
            self._check_purpose(cert, path)

    def _check_purpose(self, cert: x509.Certificate, path: str) -> None:
        try:
            ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        except x509.ExtensionNotFound:
            return
        purposes = set(ext.value)
        anyone = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in purposes
        if self.is_server:
            if not (anyone or ExtendedKeyUsageOID.SERVER_AUTH in purposes) and ext.critical:
                raise QMPError(f"Certificate {path} purpose does not allow use with a "
                               "TLS server")
        elif not (anyone or ExtendedKeyUsageOID.CLIENT_AUTH in purposes) and ext.critical:
            raise QMPError(f"Certificate {path} purpose does not allow use with a TLS client")

    def _check_chain(self, certs: list[x509.Certificate]) -> None:
        """QEMU's qcrypto_tls_creds_check_authority_chain(): every certificate of the
        chain up to a self-signed one must have its issuer in ca-cert.pem."""
        for cert, issuer in zip(certs, certs[1:], strict=False):
            if not _issued_by(cert, issuer):
                raise QMPError(f"Cert '{dn_string(issuer.subject)}' does not match issuer "
                               f"of cert '{dn_string(cert.subject)}'")
        current = certs[-1]
        seen = 0
        while not _issued_by(current, current):
            found = next((ca for ca in self.ca_certs if _issued_by(current, ca)), None)
            if found is None or seen > len(self.ca_certs):
                raise QMPError(f"Cert '{dn_string(current.subject)}' has no issuer in CA chain")
            self._check_cert(found, self.ca_path, True)
            current = found
            seen += 1
        self._check_cert(current, self.ca_path, True)

    def new_server_engine(self) -> TlsEngine:
        return SslObjectEngine(self.context)

    def client_context(self) -> ssl.SSLContext:
        return self.context


# OpenSSL's verify results and the reasons QEMU gives for GnuTLS's (tlssession.c).
_VERIFY_REASONS = {
    2: "The certificate hasn't got a known issuer",      # unable to get issuer cert
    18: "The certificate hasn't got a known issuer",     # self-signed
    19: "The certificate hasn't got a known issuer",     # self-signed in chain
    20: "The certificate hasn't got a known issuer",     # no local issuer
    23: "The certificate has been revoked",
}


def verify_failure_text(verify_code: int) -> str:
    """What QEMU's client says when the server's certificate chain does not verify."""
    return _VERIFY_REASONS.get(verify_code, "The certificate is not trusted")


def certificate_matches(der: bytes, hostname: str) -> bool:
    """GnuTLS's gnutls_x509_crt_check_hostname(): an IP address against the IP
    subjectAltNames, a name against the DNS ones (a leading ``*.`` label matches one
    label), or against the common name when there are no DNS names."""
    import ipaddress

    cert = x509.load_der_x509_certificate(der)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    if address is not None:
        return address in names.get_values_for_type(x509.IPAddress)
    dns = names.get_values_for_type(x509.DNSName)
    if not dns:
        dns = [str(attr.value) for attr in
               cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    wanted = hostname.lower().rstrip(".")
    for pattern in (name.lower().rstrip(".") for name in dns):
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted and \
                wanted.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


_PSK_PROPERTIES = (
    Property("username", "str", get=read_string("username"), set=store("username")),
)


class TlsCredsPsk(TlsCreds, qom_type="tls-creds-psk", interfaces=("user-creatable",),
                  properties=_PSK_PROPERTIES):
    """``tls-creds-psk``: ``dir/keys.psk`` holds ``username:hexkey`` lines; a client
    uses the key of ``username`` (default ``qemu``), a server accepts any listed user."""

    def __init__(self) -> None:
        super().__init__()
        self.username: str | None = None

    def complete(self) -> None:
        if self.dir is None:
            raise QMPError("Missing 'dir' property value")
        if self.is_server:
            if self.username is not None:
                raise QMPError("username should not be set when endpoint=server")
            path = self._path("keys.psk", True)
            assert path is not None
            self.keys_path = path
            self._path("dh-params.pem", False)
        else:
            path = self._path("keys.psk", True)
            assert path is not None
            self.keys_path = path
            username = "qemu" if self.username is None else self.username
            if username not in self.read_keys():
                raise QMPError(f"Username {username} not found in PSK file {path}")

    def read_keys(self) -> dict[str, bytes]:
        """The keys file, read at each use as GnuTLS does (so edits apply at once)."""
        keys: dict[str, bytes] = {}
        try:
            with open(self.keys_path, encoding="utf-8", errors="replace") as f:
                lines = f.read().split("\n")
        except OSError as exc:
            raise QMPError(f"Cannot read PSK file {self.keys_path}: {exc.strerror}") from None
        for line in lines:
            user, sep, hexkey = line.rstrip("\r").partition(":")
            if not sep or user in keys:
                continue
            try:
                keys[user] = bytes.fromhex(hexkey.strip())
            except ValueError:
                continue
        return keys

    def new_server_engine(self) -> TlsEngine:
        return new_psk_engine(self)

    def client_context(self) -> ssl.SSLContext:
        """A PSK client context: ``username`` (default ``qemu``) and its key, read at
        each handshake. Python's ``ssl`` has PSK client callbacks from 3.13 on."""
        if not hasattr(ssl.SSLContext, "set_psk_client_callback"):
            raise QMPError("TLS-PSK client sessions need Python 3.13 or later")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers(PSK_CIPHERS)
        versions = self.tls_versions()
        if versions is not None:
            context.minimum_version, context.maximum_version = versions
        user = "qemu" if self.username is None else self.username

        def identity(hint: str | None) -> tuple[str, bytes]:
            return user, self.read_keys().get(user, b"")

        context.set_psk_client_callback(identity)  # type: ignore[attr-defined,unused-ignore]
        return context


def new_psk_engine(creds: TlsCredsPsk) -> TlsEngine:
    """PSK through ``ssl`` where it has PSK callbacks, through libssl before 3.13."""
    if sys.version_info >= (3, 13) and os.environ.get("QSD_PSK_ENGINE") != "libssl":
        return stdlib_psk_engine(creds.read_keys, creds.tls_versions())
    from qsd.crypto.psk_libssl import LibsslPskEngine

    return LibsslPskEngine(creds.read_keys, creds.tls_versions())
