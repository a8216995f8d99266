"""object-add / object-del: iothreads, secrets, TLS credentials and authorization objects.

Ids are one namespace, as under QEMU's /objects. Objects other than iothreads are kept in
``daemon.objects``; their users look them up by id when they need them (QEMU does the
same), so deleting one never breaks a user that already holds it: QEMU's tls-creds and
secrets have no in-use check, and 11.1.3 deletes them while an NBD server uses them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qsd.authz import AuthzList, AuthzListFile, AuthzSimple
from qsd.commands.registry import command
from qsd.crypto.secret import Secret
from qsd.crypto.tlscreds import TlsCredsPsk, TlsCredsX509
from qsd.errors import QMPError
from qsd.iothread import IOThread
from qsd.qapi.generated import (
    AuthZListFileProperties,
    AuthZListProperties,
    AuthZSimpleProperties,
    ObjectDelArgs,
    ObjectOptions,
    SecretProperties,
    TlsCredsPskProperties,
    TlsCredsX509Properties,
)

if TYPE_CHECKING:
    from qsd.daemon import Daemon

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")


def _create(daemon: Daemon, args: ObjectOptions) -> object:
    objects = daemon.all_objects
    if isinstance(args, SecretProperties):
        return Secret.from_options(args.id, args, objects)
    if isinstance(args, TlsCredsX509Properties):
        return TlsCredsX509(args.id, args, objects)
    if isinstance(args, TlsCredsPskProperties):
        return TlsCredsPsk(args.id, args)
    if isinstance(args, AuthZSimpleProperties):
        return AuthzSimple(args)
    if isinstance(args, AuthZListProperties):
        return AuthzList(args)
    if isinstance(args, AuthZListFileProperties):
        return AuthzListFile(args)
    raise AssertionError(f"unhandled object type {args.qom_type}")


@command("object-add")
async def object_add(daemon: Daemon, args: ObjectOptions) -> None:
    if not _IDENTIFIER.match(args.id):
        raise QMPError("Parameter 'id' expects an identifier")
    if args.id in daemon.iothreads or args.id in daemon.objects:
        raise QMPError(f"attempt to add duplicate property '{args.id}' to object "
                       "(type 'container')")
    if args.qom_type.value == "iothread":
        daemon.iothreads[args.id] = IOThread.from_options(args)
    else:
        daemon.objects[args.id] = _create(daemon, args)


@command("object-del")
async def object_del(daemon: Daemon, args: ObjectDelArgs) -> None:
    if args.id in daemon.objects:
        del daemon.objects[args.id]
        return
    iothread = daemon.iothreads.get(args.id)
    if iothread is None:
        raise QMPError(f"object '{args.id}' not found")
    if iothread.in_use():
        raise QMPError(f"object '{args.id}' is in use, can not be deleted")
    del daemon.iothreads[args.id]
    iothread.stop()
