"""The QOM area: object-add and object-del for every user-creatable type, and qom-list,
qom-get, qom-set, qom-list-get, qom-list-types and qom-list-properties over the tree.

Ids are one namespace, QEMU's /objects. Users of secrets, TLS credentials and authz
objects look them up by id when they need them (QEMU does the same), so deleting one
never breaks a user that already holds it: QEMU's tls-creds and secrets have no in-use
check, and 11.1.3 deletes them while an NBD server uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.commands.registry import command
from qsd.errors import QMPError
from qsd.ids import ID_HINT, id_wellformed
from qsd.qapi.generated import (
    ObjectDelArgs,
    ObjectOptions,
    QomGetArgs,
    QomListArgs,
    QomListGetArgs,
    QomListPropertiesArgs,
    QomListTypesArgs,
    QomSetArgs,
)
from qsd.qom.model import (
    QOMObject,
    all_types,
    class_properties,
    get_property,
    list_properties,
    resolve_path,
    set_property,
    type_by_name,
)
from qsd.qom.usercreatable import add_object, delete_object

if TYPE_CHECKING:
    from qsd.daemon import Daemon

# The order of QEMU 11.1.3's type table (qom-list-types), for the types qsd has.
_TYPE_ORDER = (
    "authz-simple", "secret_common", "container", "interface", "iothread", "secret", "authz",
    "monitor", "tls-creds-psk", "tls-creds", "main-loop", "authz-list-file", "chardev-null",
    "authz-list", "monitor-qmp", "event-loop-base", "chardev-fd", "chardev", "user-creatable",
    "chardev-socket", "chardev-stdio", "object", "tls-creds-x509", "chardev-file",
    "throttle-group",
)


@command("object-add")
async def object_add(daemon: Daemon, args: ObjectOptions) -> None:
    if not id_wellformed(args.id):
        raise QMPError("Parameter 'id' expects an identifier", hint=ID_HINT)
    add_object(daemon.objects, args)


@command("object-del")
async def object_del(daemon: Daemon, args: ObjectDelArgs) -> None:
    delete_object(daemon.objects, args.id)


def _not_found(path: str) -> QMPError:
    return QMPError(f"Device '{path}' not found", "DeviceNotFound")


def _lookup(daemon: Daemon, path: str) -> QOMObject:
    """qom-list's lookup: an ambiguous partial path is reported as such."""
    obj, ambiguous = resolve_path(daemon.qom_root, path)
    if obj is None:
        if ambiguous:
            raise QMPError(f"Path '{path}' is ambiguous")
        raise _not_found(path)
    return obj


def _lookup_quiet(daemon: Daemon, path: str) -> QOMObject:
    """qom-get's and qom-set's lookup: any failure is "not found"."""
    obj, _ = resolve_path(daemon.qom_root, path)
    if obj is None:
        raise _not_found(path)
    return obj


@command("qom-list")
async def qom_list(daemon: Daemon, args: QomListArgs) -> list[dict[str, object]]:
    obj = _lookup(daemon, args.path)
    return [{"name": name, "type": kind} for name, kind, _ in list_properties(obj)]


@command("qom-list-get")
async def qom_list_get(daemon: Daemon, args: QomListGetArgs) -> list[dict[str, object]]:
    objects = [_lookup(daemon, path) for path in args.paths]
    return [{"properties": [{"name": name, "type": kind, "value": get()}
                            for name, kind, get in list_properties(obj)]}
            for obj in objects]


@command("qom-get")
async def qom_get(daemon: Daemon, args: QomGetArgs) -> object:
    return get_property(_lookup_quiet(daemon, args.path), args.property)


@command("qom-set")
async def qom_set(daemon: Daemon, args: QomSetArgs) -> None:
    set_property(_lookup_quiet(daemon, args.path), args.property, args.value)


@command("qom-list-types")
async def qom_list_types(daemon: Daemon, args: QomListTypesArgs) -> list[dict[str, object]]:
    position = {name: index for index, name in enumerate(_TYPE_ORDER)}
    result: list[dict[str, object]] = []
    for cls in sorted(all_types(), key=lambda cls: position[cls.name]):
        if args.implements is not None and not cls.implements(args.implements):
            continue
        if cls.abstract and not args.abstract:
            continue
        info: dict[str, object] = {"name": cls.name}
        if cls.abstract:
            info["abstract"] = True
        if cls.parent is not None:
            info["parent"] = cls.parent.name
        result.append(info)
    return result


@command("qom-list-properties")
async def qom_list_properties(daemon: Daemon, args: QomListPropertiesArgs
                              ) -> list[dict[str, object]]:
    cls = type_by_name(args.typename)
    if cls is None:
        raise QMPError(f"Class '{args.typename}' not found", "DeviceNotFound")
    if not cls.implements("object"):
        raise QMPError("Parameter 'typename' expects a QOM type")
    return [{"name": name, "type": kind} for name, kind in class_properties(cls)]
