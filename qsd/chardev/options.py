"""``--chardev``: QEMU's QemuOpts syntax, read into the ``ChardevBackend`` QMP uses.

The steps and texts are QEMU's: qemu_opts_parse_noisily() (implied ``backend``, ``,,``
for a comma, short-form flags with a deprecation warning, typed values), then
qemu_chr_new_from_opts() and each backend's ``parse`` hook, which set defaults that
differ from QMP's (a server waits for its first client unless ``wait=off``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from qsd import qapi
from qsd.errors import QMPError, print_hint, warn_report
from qsd.ids import ID_HINT, id_wellformed
from qsd.qapi.generated import ChardevBackend

# qemu_chardev_opts in QEMU 11.1 (``--chardev socket,help`` lists it), by value type.
_OPTION_TYPES = {
    "abstract": "bool", "append": "bool", "backend": "str", "chardev": "str",
    "chardevs.0": "str", "chardevs.1": "str", "chardevs.2": "str", "chardevs.3": "str",
    "clipboard": "bool", "cols": "num", "debug": "num", "delay": "bool", "encoding": "str",
    "fd": "str", "height": "num", "host": "str", "input-path": "str", "ipv4": "bool",
    "ipv6": "bool", "localaddr": "str", "localport": "str", "logappend": "bool",
    "logfile": "str", "logtimestamp": "bool", "mouse": "bool", "mux": "bool", "name": "str",
    "nodelay": "bool", "path": "str", "port": "str", "reconnect-ms": "num", "rows": "num",
    "server": "bool", "signal": "bool", "size": "size", "telnet": "bool", "tight": "bool",
    "tls-authz": "str", "tls-creds": "str", "tn3270": "bool", "to": "num", "wait": "bool",
    "websocket": "bool", "width": "num",
}
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
# qemu_strtou64() with base 0: decimal, 0x hex or 0 octal, a sign wraps like strtoull().
_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")

# The backends qsd implements, in the order QEMU's ``--chardev help`` lists them.
BACKENDS = ("file", "stdio", "socket", "null")


class ChardevOptions(NamedTuple):
    """A parsed ``--chardev``: the id and backend, or ``help`` for the backend list."""

    id: str = ""
    backend: ChardevBackend | None = None
    help: bool = False


def _split(text: str) -> list[str]:
    """Splits at single commas; ``,,`` is a literal comma inside a value."""
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
    return [part for part in parts if part]


def _flag(name: str) -> tuple[str, str]:
    """A parameter without ``=``: ``noX`` means X=off, anything else X=on (deprecated)."""
    prefix, value = "", "on"
    if name.startswith("no"):
        name, prefix, value = name[2:], "no", "off"
    warn_report(f"short-form boolean option '{prefix}{name}' deprecated")
    if name == "delay":
        print_hint(f"Please use nodelay={'on' if prefix else 'off'} instead")
    else:
        print_hint(f"Please use {name}={value} instead")
    return name, value


def _number(name: str, value: str) -> int:
    match = _NUMBER.match(value)
    if match is None:
        raise QMPError(f"Parameter '{name}' expects a number")
    digits = match.group(2)
    if digits[:2] in ("0x", "0X"):
        number = int(digits[2:], 16)
    else:
        number = int(digits, 8 if digits.startswith("0") else 10)
    if number >= 1 << 64:
        raise QMPError(f"Parameter '{name}' expects a number")
    return (-number) % (1 << 64) if match.group(1) == "-" else number


def _typed(name: str, value: str) -> object:
    kind = _OPTION_TYPES.get(name)
    if kind is None:
        raise QMPError(f"Invalid parameter '{name}'")
    if kind == "bool":
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise QMPError(f"Parameter '{name}' expects 'on' or 'off'")
    if kind == "num":
        return _number(name, value)
    return value


def _parse_qemu_opts(text: str) -> tuple[str | None, dict[str, object]]:
    """QEMU's qemu_opts_parse_noisily(): the id (checked first) and the typed options."""
    params = _split(text)
    chardev_id: str | None = None
    for param in params:
        key, has_value, value = param.partition("=")
        if has_value and key == "id":
            chardev_id = value
    if chardev_id is not None and not id_wellformed(chardev_id):
        raise QMPError("Parameter 'id' expects an identifier", hint=ID_HINT)
    opts: dict[str, object] = {}
    for index, param in enumerate(params):
        key, has_value, value = param.partition("=")
        if not has_value:
            key, value = ("backend", param) if index == 0 else _flag(param)
        if key == "id":
            continue
        opts[key] = _typed(key, value)
    return chardev_id, opts


def _signed64(number: int) -> int:
    return number - (1 << 64) if number >= 1 << 63 else number


def _socket(opts: dict[str, object]) -> dict[str, object]:
    """QEMU's qemu_chr_parse_socket()."""
    path, host, fd = opts.get("path"), opts.get("host"), opts.get("fd")
    if sum(value is not None for value in (path, host, fd)) > 1:
        raise QMPError("None or one of 'path', 'fd' or 'host' option required.")
    if host is not None and "port" not in opts:
        raise QMPError("chardev: socket: no port given")
    if "delay" in opts and "nodelay" in opts:
        raise QMPError("'delay' and 'nodelay' are mutually exclusive")
    data = _common(opts)
    if "delay" in opts or "nodelay" in opts:
        data["nodelay"] = not opts.get("delay", True) or bool(opts.get("nodelay", False))
    server = bool(opts.get("server", False))
    data["server"] = server
    for name in ("telnet", "tn3270", "websocket"):
        if name in opts:
            data[name] = opts[name]
    if "wait" in opts or server:
        data["wait"] = opts.get("wait", True)
    if "reconnect-ms" in opts:
        data["reconnect-ms"] = _signed64(int(str(opts["reconnect-ms"])))
    for name in ("tls-creds", "tls-authz"):
        if name in opts:
            data[name] = opts[name]
    addr: dict[str, object]
    if path is not None:
        addr = {"path": path, "tight": opts.get("tight", True),
                "abstract": opts.get("abstract", False)}
        kind = "unix"
    elif host is not None:
        addr = {"host": host, "port": opts["port"]}
        if "to" in opts:
            addr["to"] = int(str(opts["to"])) & 0xFFFF
        for name in ("ipv4", "ipv6"):
            if name in opts:
                addr[name] = opts[name]
        kind = "inet"
    else:
        addr = {"str": "" if fd is None else fd}
        kind = "fd"
    data["addr"] = {"type": kind, "data": addr}
    return data


def _file(opts: dict[str, object]) -> dict[str, object]:
    """QEMU's qemu_chr_parse_file_out()."""
    if "path" not in opts:
        raise QMPError("chardev: file: no filename given")
    data = _common(opts)
    data["out"] = opts["path"]
    if "input-path" in opts:
        data["in"] = opts["input-path"]
    data["append"] = bool(opts.get("append", False))
    return data


def _common(opts: dict[str, object]) -> dict[str, object]:
    """QEMU's qemu_chr_parse_common()."""
    data: dict[str, object] = {"logappend": bool(opts.get("logappend", False)),
                               "logtimestamp": bool(opts.get("logtimestamp", False))}
    if "logfile" in opts:
        data["logfile"] = opts["logfile"]
    return data


def parse_chardev_option(text: str) -> ChardevOptions:
    """``--chardev text`` as the ChardevBackend QMP's chardev-add would take."""
    chardev_id, opts = _parse_qemu_opts(text)
    name = opts.get("backend")
    if name in ("help", "?"):
        return ChardevOptions(help=True)
    if chardev_id is None:
        raise QMPError("chardev: no id specified")
    if name is None:
        raise QMPError(f'chardev: "{chardev_id}" missing backend')
    if name not in BACKENDS:
        raise QMPError(f"'{name}' is not a valid char driver name")
    if opts.get("mux"):
        raise QMPError("chardev option 'mux' is not supported")
    if name == "socket":
        data = _socket(opts)
    elif name == "file":
        data = _file(opts)
    elif name == "stdio":
        data = {**_common(opts), "signal": opts.get("signal", True)}
    else:
        data = _common(opts)
    backend: ChardevBackend = qapi.parse_type("ChardevBackend", {"type": name, "data": data})
    return ChardevOptions(chardev_id, backend)


def help_text() -> str:
    """What ``--chardev help`` prints."""
    return "Available chardev backend types: " + "".join(f"\n  {b}" for b in BACKENDS) + "\n"
