"""Applies command-line options to a Daemon through the same code paths as QMP.

``--blockdev``, ``--export`` and ``--object`` become the QMP commands they are equivalent
to; ``--chardev`` follows QEMU's legacy QemuOpts syntax; ``--monitor`` attaches a QMP
monitor to a chardev defined earlier.
"""

from __future__ import annotations

import sys
from typing import Any

from qsd import qapi
from qsd.chardev import Chardev, NullChardev, SocketChardev, SocketSpec, StdioChardev
from qsd.commands.char import add_chardev
from qsd.commands.registry import HANDLERS
from qsd.daemon import Daemon
from qsd.errors import QMPError
from qsd.keyval import keyval_parse
from qsd.qapi.generated import ObjectType
from qsd.qmp.jsonstream import parse_json_text
from qsd.qmp.monitor import Monitor

# QemuOpts keys QEMU's socket chardev accepts; the unsupported ones are ignored like
# options that do not apply to a storage daemon's monitor.
_CHARDEV_KEYS = {
    "backend", "id", "path", "host", "port", "fd", "server", "wait", "nodelay", "delay",
    "telnet", "tn3270", "websocket", "reconnect", "reconnect-ms", "ipv4", "ipv6", "to",
    "abstract", "tight", "mux", "logfile", "logappend", "signal",
}
_BOOLEANS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def _split_qemu_opts(text: str) -> list[str]:
    """Splits at single commas; ``,,`` stands for a literal comma."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def parse_chardev_opts(text: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for index, part in enumerate(_split_qemu_opts(text)):
        if not part:
            continue
        key, has_value, value = part.partition("=")
        if not has_value:
            if index == 0:
                key, value = "backend", part
            elif key.startswith("no") and key[2:] in _CHARDEV_KEYS:
                key, value = key[2:], "off"
            else:
                value = "on"
        if key not in _CHARDEV_KEYS:
            raise QMPError(f"Invalid parameter '{key}'")
        opts[key] = value
    return opts


def _opt_bool(opts: dict[str, str], key: str, default: bool) -> bool:
    if key not in opts:
        return default
    try:
        return _BOOLEANS[opts[key]]
    except KeyError:
        raise QMPError(f"Parameter '{key}' expects 'on' or 'off'") from None


def chardev_from_opts(opts: dict[str, str]) -> Chardev:
    chardev_id = opts.get("id")
    if not chardev_id:
        raise QMPError("chardev: no id specified")
    backend = opts.get("backend", "")
    if backend == "stdio":
        return StdioChardev(chardev_id)
    if backend == "null":
        return NullChardev(chardev_id)
    if backend not in ("socket", "unix", "tcp"):
        raise QMPError(f"'{backend}' is not a valid char driver name")
    server = _opt_bool(opts, "server", False)
    wait = server and _opt_bool(opts, "wait", True)
    if "path" in opts:
        spec = SocketSpec("unix", path=opts["path"], server=server, wait=wait)
    elif "host" in opts or "port" in opts:
        if "host" not in opts:
            raise QMPError("chardev: socket: no host given")
        if "port" not in opts:
            raise QMPError("chardev: socket: no port given")
        spec = SocketSpec("inet", host=opts["host"], port=opts["port"], server=server, wait=wait)
    elif "fd" in opts:
        spec = SocketSpec("fd", fd=opts["fd"], server=server, wait=wait)
    else:
        raise QMPError("chardev: socket: no host given")
    return SocketChardev(chardev_id, spec)


def _structured(text: str, implied_key: str | None) -> tuple[object, bool]:
    """The option's value as a QObject-like tree, and whether it came from keyval."""
    if text.lstrip().startswith("{"):
        return parse_json_text(text), False
    return keyval_parse(text, implied_key), True


def _typed(type_name: str, text: str, implied_key: str | None) -> Any:
    value, from_keyval = _structured(text, implied_key)
    return qapi.parse_type(type_name, value, keyval=from_keyval)


async def _monitor(daemon: Daemon, text: str) -> None:
    opts = _typed("MonitorOptions", text, "chardev")
    if getattr(opts.mode, "value", opts.mode) == "readline":
        raise QMPError("Only QMP is supported")
    chardev = daemon.chardevs.get(opts.chardev)
    if chardev is None:
        raise QMPError(f'chardev "{opts.chardev}" not found')
    if chardev.frontend is not None:
        raise QMPError(f"Device '{opts.chardev}' is in use")
    monitor = Monitor(daemon, opts.id, bool(opts.pretty))
    daemon.monitors.append(monitor)
    chardev.attach(monitor.serve_connection)


def _print_object_help() -> None:
    sys.stdout.write("List of user creatable objects:\n" + "".join(
        f"  {kind.value}\n" for kind in ObjectType))


async def apply_option(daemon: Daemon, name: str, text: str) -> bool:
    """Applies one option; False means it printed help and the daemon should exit 0."""
    if name == "blockdev":
        await HANDLERS["blockdev-add"](daemon, _typed("BlockdevOptions", text, "driver"))
    elif name == "export":
        await HANDLERS["block-export-add"](daemon, _typed("BlockExportOptions", text, "type"))
    elif name == "object":
        if text == "help":
            _print_object_help()
            return False
        await HANDLERS["object-add"](daemon, _typed("ObjectOptions", text, "qom-type"))
    elif name == "chardev":
        await add_chardev(daemon, chardev_from_opts(parse_chardev_opts(text)))
    elif name == "monitor":
        await _monitor(daemon, text)
    elif name == "nbd-server":
        from qsd.commands.nbd import nbd_server_start_options

        await nbd_server_start_options(daemon, _typed("NbdServerOptions", text, None))
    else:
        raise AssertionError(f"unhandled option --{name}")
    return True
