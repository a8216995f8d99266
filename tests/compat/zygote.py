"""A qsd that is imported once and forks a daemon per request (see launch.py).

Protocol on the SOCK_SEQPACKET socket given as argv[1]: the parent sends
``{"argv": [...], "cwd": "..."}`` with three descriptors (the daemon's stdin, stdout,
stderr) attached; the zygote answers ``{"pid": N}`` and later ``{"exit": N, "status": S}``
(``os.waitstatus_to_exitcode``).  The zygote never starts an event loop or a thread, so
forking it is safe; it ends when the parent closes the socket.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import sys
import traceback


def _run_daemon(sock: socket.socket, request: dict[str, object], fds: list[int]) -> None:
    """In the forked child: become the daemon and never return."""
    status = 1
    try:
        sock.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        cwd = request["cwd"]
        argv = request["argv"]
        assert isinstance(cwd, str) and isinstance(argv, list)
        os.chdir(cwd)
        from qsd.__main__ import main

        status = main([str(arg) for arg in argv])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


def _receive(sock: socket.socket) -> tuple[dict[str, object], list[int]] | None:
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
    if not data:
        return None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data), list(fds)


def serve(sock: socket.socket) -> None:
    children: dict[int, int] = {}  # pidfd -> pid
    sock.send(json.dumps({"ready": 1}).encode())
    while True:
        ready, _, _ = select.select([sock, *children], [], [])
        for fd in ready:
            if fd is sock:
                received = _receive(sock)
                if received is None:
                    return
                request, fds = received
                pid = os.fork()
                if pid == 0:
                    _run_daemon(sock, request, fds)
                for passed in fds:
                    os.close(passed)
                children[os.pidfd_open(pid)] = pid
                sock.send(json.dumps({"pid": pid}).encode())
            else:
                pid = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                sock.send(json.dumps(
                    {"exit": pid, "status": os.waitstatus_to_exitcode(status)}).encode())


def main() -> None:
    # Everything a daemon may import, so that a forked daemon starts at once.
    import qsd.__main__
    import qsd.commands.registry
    import qsd.daemon
    import qsd.export.fuse.export
    import qsd.export.nbd
    import qsd.qom.model
    import qsd.startup  # noqa: F401

    qsd.commands.registry.load_all()
    qsd.qom.model.load_all_types()
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
