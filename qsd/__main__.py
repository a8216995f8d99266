"""Entry point: ``qsd [options]`` / ``python -m qsd``.

The started process is the daemon itself (scripts wait on its PID); only ``--daemonize``
forks, and then the parent exits once the child is ready, with the child's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import uvloop

from qsd.aio import set_main_context
from qsd.cli import CommandLine, UsageError, help_text, parse_args, version_text
from qsd.commands.registry import load_all
from qsd.errors import PROGRAM, QMPError, print_hint


def _error(message: str) -> None:
    sys.stderr.write(f"{PROGRAM}: {message}\n")
    sys.stderr.flush()


def _write_pidfile(path: str) -> None:
    """Like QEMU: the pid file is locked so a second daemon cannot claim it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise QMPError(f"Could not create '{path}': {os.strerror(exc.errno or 0)}") from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise QMPError(f"Cannot lock pid file: {os.strerror(exc.errno or 0)}") from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    # The descriptor stays open (and locked) until the process exits.


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


async def _run(cmdline: CommandLine, ready_fd: int | None) -> int:
    from qsd.daemon import Daemon
    from qsd.startup import apply_option

    set_main_context(asyncio.get_running_loop())
    daemon = Daemon()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, daemon.request_shutdown)
    pidfile: str | None = None  # absolute: --daemonize changes to / before the end
    try:
        for option in cmdline.options:
            try:
                if not await apply_option(daemon, option.name, option.value, option.location()):
                    return 0
            except QMPError as exc:
                _error(f"{option.location()}: {exc.desc}")
                if exc.hint is not None:
                    print_hint(exc.hint)
                return 1
        if cmdline.pidfile is not None:
            try:
                _write_pidfile(cmdline.pidfile)
            except QMPError as exc:
                _error(f"cannot create PID file: {exc.desc}")
                return 1
            pidfile = os.path.abspath(cmdline.pidfile)
        daemon.start_monitors()
        if ready_fd is not None:
            os.write(ready_fd, b"\0")
            os.close(ready_fd)
            os.chdir("/")
            _detach_stdio()
        await daemon.wait_for_shutdown_request()
    finally:
        try:
            await daemon.shutdown()
        finally:
            if pidfile is not None:
                with contextlib.suppress(OSError):
                    os.unlink(pidfile)
    return 0


def _daemonize() -> int:
    """Forks; the parent waits for the child's ready byte and exits with its verdict."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        ready = os.read(read_fd, 1)
        if ready:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) or 1)
    os.close(read_fd)
    os.setsid()
    return write_fd


def main(argv: list[str] | None = None) -> int:
    # Until the main loop handles them, SIGINT and SIGHUP end the process at once, as
    # SIGTERM does: nothing is mounted or written before then. (Python's own SIGINT
    # handler would raise KeyboardInterrupt in the middle of whatever runs.)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    args = sys.argv[1:] if argv is None else argv
    try:
        cmdline = parse_args(args)
    except UsageError as exc:
        _error(str(exc))
        return 1
    if cmdline.info is not None:
        sys.stdout.write(help_text() if cmdline.info == "help" else version_text())
        return 0
    logging.basicConfig(level=logging.WARNING, format=f"{PROGRAM}: %(message)s")
    load_all()
    ready_fd = _daemonize() if cmdline.daemonize else None
    return uvloop.run(_run(cmdline, ready_fd))


if __name__ == "__main__":
    sys.exit(main())
