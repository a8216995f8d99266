"""IOThread objects: an OS thread running its own uvloop loop, wrapped as an AioContext.

Nodes and export queues run in an iothread's context; the refcount of those users lets
``object-del`` refuse to delete an iothread that is still in use.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
from typing import Any

import uvloop

from qsd.aio import AioContext

_PR_SET_NAME = 15
_by_context: dict[int, IOThread] = {}


def _set_os_thread_name(name: str) -> None:
    """Shows the id in ps/top (Linux comm, at most 15 bytes); cosmetic, so never fatal."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass


class IOThread:
    """``--object iothread,id=X``: its thread starts at once and runs until stop()."""

    def __init__(self, id: str, *, poll_max_ns: int = 32768, poll_grow: int = 0,
                 poll_shrink: int = 0, aio_max_batch: int = 0,
                 thread_pool_min: int = 0, thread_pool_max: int = 64) -> None:
        self.id = id
        self.poll_max_ns = poll_max_ns
        self.poll_grow = poll_grow
        self.poll_shrink = poll_shrink
        self.aio_max_batch = aio_max_batch
        self.thread_pool_min = thread_pool_min
        self.thread_pool_max = thread_pool_max
        self._users = 0
        self._users_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name=id, daemon=True)
        self.ctx = AioContext(id, self.loop, self.thread)
        self.thread.start()
        ready.wait()
        _by_context[id_of(self.ctx)] = self

    @classmethod
    def from_options(cls, opts: Any) -> IOThread:
        """From the object-add / --object model (absent properties take QEMU's defaults)."""
        kwargs = {}
        for name in ("poll_max_ns", "poll_grow", "poll_shrink", "aio_max_batch",
                     "thread_pool_min", "thread_pool_max"):
            value = getattr(opts, name, None)
            if value is not None:
                kwargs[name] = int(value)
        return cls(opts.id, **kwargs)

    def _run(self, ready: threading.Event) -> None:
        _set_os_thread_name(self.id)
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def thread_id(self) -> int:
        """The kernel's thread id (query-iothreads' ``thread-id``)."""
        return self.thread.native_id or 0

    def ref(self) -> None:
        with self._users_lock:
            self._users += 1

    def unref(self) -> None:
        with self._users_lock:
            self._users -= 1

    def in_use(self) -> bool:
        """True while nodes or export queues run in this thread."""
        return self._users > 0

    def stop(self) -> None:
        """Stops the loop and joins the thread (pending callbacks are dropped)."""
        _by_context.pop(id_of(self.ctx), None)
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()

    def __repr__(self) -> str:
        return f"<IOThread {self.id!r}>"


def id_of(ctx: AioContext) -> int:
    return id(ctx)


def iothread_of(ctx: AioContext) -> IOThread | None:
    """The IOThread owning ``ctx``; None for the main context."""
    return _by_context.get(id_of(ctx))
