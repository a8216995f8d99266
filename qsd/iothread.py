"""IOThread objects: an OS thread running its own uvloop loop, wrapped as an AioContext.

Nodes and export queues run in an iothread's context; the refcount of those users lets
``object-del`` refuse to delete an iothread that is still in use. The polling and
batching parameters are QOM properties that can change while the thread runs; the
context carries the ones its users read (``AioContext.poll_max_ns``).
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import uvloop

from qsd.aio import POLL_MAX_NS_DEFAULT, AioContext
from qsd.errors import QMPError
from qsd.qom.model import Property, QOMObject, non_negative

_PR_SET_NAME = 15
_INT_MAX = (1 << 31) - 1
# What poll-grow, poll-shrink and poll-weight mean when left at 0 (QEMU 11.1's defaults).
_POLL_GROW_DEFAULT = 2
_POLL_SHRINK_DEFAULT = 2
_POLL_WEIGHT_DEFAULT = 3
_POLL_WEIGHT_MAX = 63
_by_context: dict[int, IOThread] = {}


def _set_os_thread_name(name: str) -> None:
    """Shows the id in ps/top (Linux comm, at most 15 bytes); cosmetic, so never fatal."""
    try:
        libc = ctypes.CDLL(None)  # the C library the process has loaded
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass


def _param(name: str, maximum: int | None = None, *, poll: bool = False
           ) -> Callable[[Any, int], None]:
    """The setter QEMU's event loop objects share: a range check, then the new value
    goes to the running loop (where a bad combination is refused, the value kept).
    An iothread's polling parameters go there alone, so a thread pool size refused
    earlier does not make them fail too."""
    attr = name.replace("-", "_")

    def setter(obj: Any, value: int) -> None:
        if maximum is None:
            non_negative(name, value)
        else:
            non_negative(name, value, maximum)
        setattr(obj, attr, value)
        if poll:
            obj.update_poll_params()
        else:
            obj.update_params()

    return setter


def _or_default(attr: str, default: int) -> Callable[[Any], int]:
    """A parameter where 0 stands for the default reads as the default."""
    return lambda obj: getattr(obj, attr) or default


_EVENT_LOOP_PROPERTIES = (
    Property("aio-max-batch", "int", get=attrgetter("aio_max_batch"),
             set=_param("aio-max-batch")),
    Property("thread-pool-min", "int", get=attrgetter("thread_pool_min"),
             set=_param("thread-pool-min")),
    Property("thread-pool-max", "int", get=attrgetter("thread_pool_max"),
             set=_param("thread-pool-max")),
)


class EventLoopBase(QOMObject, qom_type="event-loop-base", abstract=True,
                    interfaces=("user-creatable",), properties=_EVENT_LOOP_PROPERTIES):
    """What QEMU's main loop and iothreads share: batching and the thread pool's size."""

    def __init__(self) -> None:
        self.aio_max_batch = 0
        self.thread_pool_min = 0
        self.thread_pool_max = 64

    def update_params(self) -> None:
        """Applies the parameters to the running loop (nothing before it runs)."""

    def check_thread_pool(self) -> None:
        low, high = self.thread_pool_min, self.thread_pool_max
        if low > high or high <= 0 or low > _INT_MAX or high > _INT_MAX:
            raise QMPError("bad thread-pool-min/thread-pool-max values")


_IOTHREAD_PROPERTIES = (
    Property("poll-max-ns", "int", get=attrgetter("poll_max_ns"),
             set=_param("poll-max-ns", poll=True)),
    Property("poll-grow", "int", get=_or_default("poll_grow", _POLL_GROW_DEFAULT),
             set=_param("poll-grow", poll=True)),
    Property("poll-shrink", "int", get=_or_default("poll_shrink", _POLL_SHRINK_DEFAULT),
             set=_param("poll-shrink", poll=True)),
    Property("poll-weight", "int", get=_or_default("poll_weight", _POLL_WEIGHT_DEFAULT),
             set=_param("poll-weight", _POLL_WEIGHT_MAX, poll=True)),
)


class IOThread(EventLoopBase, qom_type="iothread", properties=_IOTHREAD_PROPERTIES):
    """``--object iothread,id=X``: its thread starts on completion and runs until
    object-del (or shutdown) finalizes it."""

    def __init__(self) -> None:
        super().__init__()
        self.poll_max_ns = POLL_MAX_NS_DEFAULT
        self.poll_grow = 0
        self.poll_shrink = 0
        self.poll_weight = 0
        self._users = 0
        self._users_lock = threading.Lock()
        self._ctx: AioContext | None = None

    @classmethod
    def spawn(cls, name: str, **params: int) -> IOThread:
        """A running iothread outside the object tree (for code and tests that need
        a thread of their own)."""
        iothread = cls()
        for attr, value in params.items():
            setattr(iothread, attr, value)
        iothread.qom_name = name
        iothread.complete()
        return iothread

    def complete(self) -> None:
        self.check_thread_pool()
        loop = uvloop.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(target=self._run, args=(loop, ready), name=self.id,
                                  daemon=True)
        ctx = AioContext(self.id, loop, thread)
        ctx.poll_max_ns = self.poll_max_ns
        self._ctx = ctx
        thread.start()
        ready.wait()
        _by_context[id_of(ctx)] = self

    def update_poll_params(self) -> None:
        if self._ctx is not None:
            self._ctx.poll_max_ns = self.poll_max_ns

    def update_params(self) -> None:
        if self._ctx is not None:
            self.update_poll_params()
            self.check_thread_pool()

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        _set_os_thread_name(self.id)
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @property
    def ctx(self) -> AioContext:
        """The running loop's context (an iothread in the tree is always running)."""
        assert self._ctx is not None
        return self._ctx

    @property
    def thread_id(self) -> int:
        """The kernel's thread id (query-iothreads' ``thread-id``)."""
        return self.ctx.thread.native_id or 0

    def ref(self) -> None:
        with self._users_lock:
            self._users += 1

    def unref(self) -> None:
        with self._users_lock:
            self._users -= 1

    def in_use(self) -> bool:
        """True while nodes or export queues run in this thread."""
        return self._users > 0

    def check_delete(self) -> None:
        if self.in_use():
            raise QMPError(f"object '{self.id}' is in use, can not be deleted")

    def finalize(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Stops the loop and joins the thread (pending callbacks are dropped)."""
        ctx = self._ctx
        if ctx is None:
            return
        _by_context.pop(id_of(ctx), None)
        if ctx.thread.is_alive():
            ctx.loop.call_soon_threadsafe(ctx.loop.stop)
            ctx.thread.join()

    def __repr__(self) -> str:
        return f"<IOThread {self.id!r}>"


class MainLoop(EventLoopBase, qom_type="main-loop"):
    """``--object main-loop``: the main loop's batching and thread-pool parameters.

    The main loop always runs, so every change is checked at once; there is one main
    loop, so one such object, and it cannot be deleted.
    """

    def update_params(self) -> None:
        self.check_thread_pool()

    def complete(self) -> None:
        assert self.qom_parent is not None
        if any(isinstance(obj, MainLoop) and obj is not self
               for obj in self.qom_parent.values()):
            raise QMPError("only one main-loop instance allowed")

    def check_delete(self) -> None:
        raise QMPError(f"Deleting main loop '{self.id}' is not supported")


def id_of(ctx: AioContext) -> int:
    return id(ctx)


def iothread_of(ctx: AioContext) -> IOThread | None:
    """The IOThread owning ``ctx``; None for the main context."""
    return _by_context.get(id_of(ctx))
