"""Applies command-line options to a Daemon through the same code paths as QMP.

``--blockdev``, ``--export`` and ``--object`` become the QMP commands they are equivalent
to; ``--chardev`` (QEMU's legacy QemuOpts syntax) becomes the ChardevBackend chardev-add
takes and goes through the same builder; ``--monitor`` attaches a QMP monitor to a
chardev defined earlier.
"""

from __future__ import annotations

import sys
from typing import Any

from qsd import qapi
from qsd.chardev.builder import create_chardev
from qsd.chardev.options import help_text, parse_chardev_option
from qsd.commands.registry import HANDLERS
from qsd.daemon import Daemon
from qsd.errors import QMPError, location
from qsd.ids import ID_HINT, id_wellformed
from qsd.keyval import keyval_parse
from qsd.qapi.generated import ObjectType
from qsd.qmp.jsonstream import parse_json_text
from qsd.qmp.monitor import Monitor
from qsd.qom.model import type_by_name


def _structured(text: str, implied_key: str | None) -> tuple[object, bool]:
    """The option's value as a QObject-like tree, and whether it came from keyval."""
    if text.lstrip().startswith("{"):
        return parse_json_text(text), False
    return keyval_parse(text, implied_key), True


def _typed(type_name: str, text: str, implied_key: str | None) -> Any:
    value, from_keyval = _structured(text, implied_key)
    return qapi.parse_type(type_name, value, keyval=from_keyval)


async def _monitor(daemon: Daemon, text: str) -> None:
    """A monitor object, in QEMU's order: it joins /objects (as ``compat_monitorN``
    without an id) before it looks for its chardev."""
    opts = _typed("MonitorOptions", text, "chardev")
    if getattr(opts.mode, "value", opts.mode) == "readline":
        raise QMPError("Only QMP is supported")
    if opts.id is not None and not id_wellformed(opts.id):
        raise QMPError("Parameter 'id' expects an identifier", hint=ID_HINT)
    monitor = Monitor(daemon, opts.chardev, bool(opts.pretty))
    name = opts.id
    if name is None:
        name = f"compat_monitor{daemon.unnamed_monitors}"
        daemon.unnamed_monitors += 1
    daemon.objects.add_child(name, monitor)
    try:
        monitor.complete()
    except BaseException:
        daemon.objects.remove_child(name)
        raise


def _print_object_help() -> None:
    sys.stdout.write("List of user creatable objects:\n" + "".join(
        f"  {kind.value}\n" for kind in ObjectType))


async def _chardev(daemon: Daemon, text: str) -> bool:
    options = parse_chardev_option(text)
    if options.help:
        sys.stdout.write(help_text())
        return False
    assert options.backend is not None
    if options.id in daemon.chardevs:
        raise QMPError(f"attempt to add duplicate property '{options.id}' to object "
                       "(type 'container')")
    daemon.chardevs.add_child(options.id, await create_chardev(options.id, options.backend,
                                                               objects=daemon.objects))
    return True


def _print_type_help(qom_type: str) -> bool:
    """``--object TYPE,help``: the type's properties, sorted; False for an unknown type."""
    if qom_type not in {kind.value for kind in ObjectType}:
        return False
    cls = type_by_name(qom_type)
    assert cls is not None
    settable = sorted((prop.name, prop.type) for prop in cls.iter_properties()
                      if prop.set is not None)
    lines = "".join(f"  {name}=<{kind}>\n" for name, kind in settable)
    sys.stdout.write(f"{qom_type} options:\n{lines}")
    return True


async def apply_option(daemon: Daemon, name: str, text: str, written: str = "") -> bool:
    """Applies one option; False means it printed help and the daemon should exit 0.

    ``written`` is the option as the command line had it (QEMU's location names it so).
    """
    with location(written or f"--{name} {text}"):
        return await _apply(daemon, name, text)


async def _apply(daemon: Daemon, name: str, text: str) -> bool:
    if not name:
        raise QMPError("Unexpected argument")
    if name == "blockdev":
        await HANDLERS["blockdev-add"](daemon, _typed("BlockdevOptions", text, "driver"))
    elif name == "export":
        await HANDLERS["block-export-add"](daemon, _typed("BlockExportOptions", text, "type"))
    elif name == "object":
        if text == "help":
            _print_object_help()
            return False
        qom_type, _, rest = text.removeprefix("qom-type=").partition(",")
        if rest == "help" and _print_type_help(qom_type):
            return False
        await HANDLERS["object-add"](daemon, _typed("ObjectOptions", text, "qom-type"))
    elif name == "chardev":
        return await _chardev(daemon, text)
    elif name == "monitor":
        await _monitor(daemon, text)
    elif name == "nbd-server":
        from qsd.commands.nbd import nbd_server_start_options

        await nbd_server_start_options(daemon, _typed("NbdServerOptions", text, None))
    else:
        raise AssertionError(f"unhandled option --{name}")
    return True
