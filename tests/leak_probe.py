"""Runs inside a test daemon (``Qsd(..., probe=True)``), before qsd itself starts.

QMP has no command that counts a process's asyncio tasks, and a task that never ends (a
connection handler that missed its disconnect, a request nobody answers) is a leak no
fd or thread count shows.  This starts one thread that, for each connection to the unix
socket named by ``QSD_LEAK_PROBE``, answers with one JSON object: the asyncio tasks alive
in the process (every loop's, found through the garbage collector, after a collection),
the names of the coroutines of the unfinished ones, so that a leak says what leaked, and
the names of the process's Python threads (the I/O pool's workers come and stay).
The thread and its socket are there from start-up to the end, so they cancel out of
any before/after comparison.
"""

from __future__ import annotations

import asyncio
import collections
import faulthandler
import gc
import json
import os
import signal
import socket
import threading


def _awaiting(coro: object) -> str:
    """Where a suspended coroutine waits: each coroutine it awaits, innermost last."""
    where = []
    while coro is not None and hasattr(coro, "cr_frame"):
        frame = coro.cr_frame
        if frame is not None:
            where.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None)
    return " > ".join(where)


def _tasks() -> dict[str, object]:
    gc.collect()
    tasks = [obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task)]
    pending = collections.Counter(_awaiting(task.get_coro()) for task in tasks
                                  if not task.done())
    return {"tasks": len(tasks), "pending": dict(pending),
            "threads": [thread.name for thread in threading.enumerate()]}


def _serve(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(json.dumps(_tasks()).encode())


def start(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    threading.Thread(target=_serve, args=(listener,), name="leak-probe", daemon=True).start()


start(os.environ["QSD_LEAK_PROBE"])
# A daemon that hangs in a test can be asked where: SIGUSR1 prints every thread's stack.
faulthandler.register(signal.SIGUSR1, all_threads=True)
