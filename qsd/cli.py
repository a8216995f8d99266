"""QEMU storage daemon's command line: getopt_long parsing and the help/version texts.

Options are returned in command-line order; the startup code applies them in that order,
so a node must be defined before an export names it, exactly as in QEMU's daemon.
"""

from __future__ import annotations

from typing import NamedTuple

import qsd
from qsd.errors import PROGRAM

# Long options and whether they take an argument (getopt_long's table).
LONG_OPTIONS: dict[str, bool] = {
    "blockdev": True,
    "chardev": True,
    "daemonize": False,
    "export": True,
    "help": False,
    "monitor": True,
    "nbd-server": True,
    "object": True,
    "pidfile": True,
    "trace": True,
    "version": False,
}
SHORT_OPTIONS: dict[str, str] = {"h": "help", "T": "trace", "V": "version"}

# Options that build the daemon's state; everything else is handled before start-up.
STATE_OPTIONS = ("blockdev", "chardev", "export", "monitor", "nbd-server", "object")


class UsageError(Exception):
    """A command-line error; the message is printed after ``qsd: ``."""


class Option(NamedTuple):
    """One option in command-line order; ``name`` "" is a stray argument."""

    name: str
    value: str
    written: str = ""  # as on the command line: "--blo=x", "--blo x", "extra"

    def location(self) -> str:
        """How QEMU names the option in an error message: as the user wrote it."""
        return self.written or f"--{self.name} {self.value}"


class CommandLine:
    # Plain classes and named tuples on the start-up path: a dataclass costs about as
    # much to create as the parsing it serves (its methods are compiled at import).
    def __init__(self) -> None:
        self.options: list[Option] = []
        self.info: str | None = None  # "help" or "version", whichever came first
        self.daemonize = False
        self.pidfile: str | None = None
        self.trace: list[str] = []


def _match_long(name: str) -> str:
    if name in LONG_OPTIONS:
        return name
    candidates = [opt for opt in LONG_OPTIONS if opt.startswith(name)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UsageError(f"unrecognized option '--{name}'")
    listed = " ".join(f"'--{opt}'" for opt in candidates)
    raise UsageError(f"option '--{name}' is ambiguous; possibilities: {listed}")


def parse_args(argv: list[str]) -> CommandLine:
    """Parses like QEMU's getopt_long loop ("-" mode); stops at the first error.

    Arguments that are not options stay in order among the options (QEMU reports
    ``foo: Unexpected argument`` when it gets there); ``--`` ends the command line and
    whatever follows it is ignored.
    """
    cmdline = CommandLine()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            name = _match_long(name)
            written = arg
            if LONG_OPTIONS[name]:
                if not has_value:
                    if i >= len(argv):
                        raise UsageError(f"option '--{name}' requires an argument")
                    value = argv[i]
                    written = f"{arg} {value}"
                    i += 1
            elif has_value:
                raise UsageError(f"option '--{name}' doesn't allow an argument")
            _record(cmdline, name, value, written)
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                letter = arg[j]
                j += 1
                if letter not in SHORT_OPTIONS:
                    raise UsageError(f"invalid option -- '{letter}'")
                name = SHORT_OPTIONS[letter]
                value = ""
                written = arg
                if LONG_OPTIONS[name]:
                    if j < len(arg):
                        value = arg[j:]
                    elif i < len(argv):
                        value = argv[i]
                        written = f"{arg} {value}"
                        i += 1
                    else:
                        raise UsageError(f"option requires an argument -- '{letter}'")
                    j = len(arg)
                _record(cmdline, name, value, written)
        else:
            cmdline.options.append(Option("", arg, arg))
    return cmdline


def _record(cmdline: CommandLine, name: str, value: str, written: str) -> None:
    if name in ("help", "version"):
        cmdline.info = cmdline.info or name
    elif name == "daemonize":
        cmdline.daemonize = True
    elif name == "pidfile":
        cmdline.pidfile = value
    elif name == "trace":
        cmdline.trace.append(value)
    else:
        cmdline.options.append(Option(name, value, written))


def version_text() -> str:
    major, minor, micro = qsd.QEMU_VERSION
    return (f"{PROGRAM} version {major}.{minor}.{micro} ({qsd.PACKAGE})\n"
            "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n")


HELP_TEXT = """\
Usage: {prog} [options]
QEMU storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (see the qemu(1) man page for possible options)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
                         export the specified block node over FUSE

  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over UNIX domain socket
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=fd,addr.str=<fd>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over file descriptor

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.
                         See the qemu(1) man page for documentation of the
                         objects that can be added.

  --pidfile <path>       write process ID to a file after startup

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
"""


def help_text() -> str:
    return HELP_TEXT.format(prog=PROGRAM)
