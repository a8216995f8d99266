"""Authorization objects: authz-simple, authz-list and authz-listfile (QEMU's ``authz/``).

NBD's ``tls-authz`` names one of them; it is looked up when a client has finished its
TLS handshake, and asked whether the client's identity (the x509 distinguished name)
may connect.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping
from operator import attrgetter

from qsd import qapi
from qsd.errors import QMPError
from qsd.qapi.generated import AuthZListProperties, QAuthZListPolicy, QAuthZListRule
from qsd.qom.model import Property, QOMObject, read_enum, read_string, store


class Authz(QOMObject, qom_type="authz", abstract=True):
    """Base of the authorization objects (QEMU's TYPE_QAUTHZ). Their properties can
    change at any time and apply to the next decision."""

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError


_SIMPLE_PROPERTIES = (
    Property("identity", "str", get=read_string("identity"), set=store("identity")),
)


class AuthzSimple(Authz, qom_type="authz-simple", interfaces=("user-creatable",),
                  properties=_SIMPLE_PROPERTIES):
    """Allows exactly one identity."""

    def __init__(self) -> None:
        self.identity = ""

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


_LIST_PROPERTIES = (
    Property("policy", "QAuthZListPolicy", get=read_enum("policy"), set=store("policy")),
    Property("rules", "[QAuthZListRule]", get=lambda obj: qapi.to_wire(obj.rules),
             set=store("rules")),
)


class AuthzList(Authz, qom_type="authz-list", interfaces=("user-creatable",),
                properties=_LIST_PROPERTIES):
    """The first matching rule decides; without one, the default policy does."""

    def __init__(self) -> None:
        self.policy = QAuthZListPolicy.deny
        self.rules: list[QAuthZListRule] = []

    @classmethod
    def from_options(cls, opts: AuthZListProperties) -> AuthzList:
        authz = cls()
        if opts.policy is not None:
            authz.policy = opts.policy
        authz.rules = list(opts.rules or [])
        return authz

    def is_allowed(self, identity: str) -> bool:
        for rule in self.rules:
            glob = rule.format is not None and rule.format.value == "glob"
            if fnmatch.fnmatchcase(identity, rule.match) if glob else identity == rule.match:
                return rule.policy.value == "allow"
        return self.policy == QAuthZListPolicy.allow


_LIST_FILE_PROPERTIES = (
    Property("filename", "str", get=read_string("filename"), set=store("filename")),
    Property("refresh", "bool", get=attrgetter("refresh"), set=store("refresh")),
)


class AuthzListFile(Authz, qom_type="authz-list-file", interfaces=("user-creatable",),
                    qapi_name="authz-listfile", properties=_LIST_FILE_PROPERTIES):
    """An authz-list read from a JSON file; with ``refresh`` (the default) a changed file
    is read again before the next decision, and while it cannot be read nothing is
    allowed."""

    def __init__(self) -> None:
        self.filename = ""
        self.refresh = True
        self._stamp: tuple[int, int, int] | None = None
        self._list: AuthzList | None = None

    def complete(self) -> None:
        self._stamp = self._file_stamp()
        self._list = self._load()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.filename)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> AuthzList:
        try:
            with open(self.filename, "rb") as f:
                content = f.read()
        except OSError as exc:
            raise QMPError(f"Failed to open file \u201c{self.filename}\u201d: "
                           f"{exc.strerror}") from None
        try:
            value = json.loads(content)
        except ValueError:
            raise QMPError("JSON parse error") from None
        if not isinstance(value, dict):
            raise QMPError(f"File '{self.filename}' must contain a JSON object")
        return AuthzList.from_options(qapi.parse_type("AuthZListProperties", value))

    def is_allowed(self, identity: str) -> bool:
        if self.refresh:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._list = self._load()
                except QMPError:
                    self._list = None
        return self._list is not None and self._list.is_allowed(identity)


def is_allowed_by_id(objects: Mapping[str, object], authz_id: str, identity: str) -> bool:
    """QEMU's qauthz_is_allowed_by_id(); QMPError when the object is missing or wrong."""
    obj = objects.get(authz_id)
    if obj is None:
        raise QMPError(f"Cannot find QAuthZ object ID {authz_id}")
    if not isinstance(obj, Authz):
        raise QMPError(f"Object '{authz_id}' is not a QAuthZ subclass")
    return obj.is_allowed(identity)
