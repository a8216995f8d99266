"""The ``rbd`` protocol driver: an image in a Ceph cluster, through librbd (QEMU's
block/rbd.c).

Ceph's own Python bindings (Debian's python3-rados and python3-rbd) do the work; they are
imported when the first rbd node opens, so a machine without them only lacks the driver.
Reads, writes, zero-writes, discards and flushes are librbd AIO requests: librbd calls
the completion in one of its own threads, which only hands the result to the loop that
submitted the request (``call_soon_threadsafe``).  No thread waits per request, and a
request from an iothread completes in that iothread.  What librbd offers only as a
blocking call (connecting, opening, resizing, ``diff_iterate`` for block status) runs in
the shared pool.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import importlib
import os
import types
from collections.abc import Callable, Mapping
from typing import Any, cast

from qsd.block.node import (
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    BlockNode,
    BlockStatus,
    ChildOpener,
    Data,
    in_pool,
)
from qsd.block.registry import register
from qsd.crypto.secret import lookup_secret
from qsd.errors import QMPError, error_report
from qsd.qapi.generated import BlockdevCreateOptionsRbd, BlockdevOptionsRbd

# QEMU's RBDAIOCmd, as its request failure messages print them.
_READ, _WRITE, _DISCARD, _FLUSH, _WRITE_ZEROES = range(5)
# BDRV_REQ_* flags those messages print for zero-writes.
_REQ_MAY_UNMAP = 0x4
_REQ_NO_FALLBACK = 0x100
# rbd_diff_iterate2's callback stops the iteration with a negative return.
_STOP = -errno.ECANCELED
# librbd before 1.17 reports wrong offsets to diff_iterate from offsets that are not
# object-aligned (Ceph tracker 53784); QEMU works around it for plain images.
_DIFF_OFFSET_FIXED = (1, 17, 0)
# The first bytes of a LUKS header librbd wrote (QEMU's get_specific_info probe).
_LUKS_MAGIC = {b"LUKS\xba\xbe\x00\x01": "luks", b"LUKS\xba\xbe\x00\x02": "luks2",
               b"RBDL\xba\xbe\x00\x01": "luks", b"RBDL\xba\xbe\x00\x02": "luks2"}


def _bindings() -> tuple[types.ModuleType, types.ModuleType]:
    """The rados and rbd modules, or the error QEMU gives without its rbd module."""
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError:
        raise QMPError("Unknown driver 'rbd'") from None


def _errno(exc: Exception) -> int:
    return getattr(exc, "errno", None) or errno.EIO


def _failed(message: str, exc: Exception) -> QMPError:
    """QEMU's error_setg_errno(): the message, then the error's strerror."""
    return QMPError(f"{message}: {os.strerror(_errno(exc))}")


def _settle(future: asyncio.Future[tuple[int, Any]], ret: int, data: Any) -> None:
    if not future.done():
        future.set_result((ret, data))


def _configure(rados: types.ModuleType, options: BlockdevOptionsRbd,
               objects: Mapping[str, object], cache: bool) -> Any:
    """rados_create() and the configuration: the conf file, the monitors, the key, the
    authentication modes, librbd's cache."""
    try:
        cluster = rados.Rados(rados_id=options.user)
    except rados.Error as exc:
        raise _failed("error initializing", exc) from None
    try:
        try:
            cluster.conf_read_file(options.conf)
        except rados.Error as exc:
            # Without conf the default places are tried, and their absence ignored.
            if options.conf is not None:
                raise _failed(f"error reading conf file {options.conf}", exc) from None
        if options.server:
            hosts = ";".join(f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
                             for s in options.server)
            try:
                cluster.conf_set("mon_host", hosts)
            except rados.Error as exc:
                raise _failed("Could not set 'mon_host'", exc) from None
        if options.key_secret is not None:
            key = base64.b64encode(lookup_secret(objects, options.key_secret))
            try:
                cluster.conf_set("key", key.decode("ascii"))
            except rados.Error as exc:
                raise _failed("Could not set 'key'", exc) from None
        if options.auth_client_required is not None:
            modes = ";".join(str(mode.value) for mode in options.auth_client_required)
            try:
                cluster.conf_set("auth_client_required", modes)
            except rados.Error as exc:
                raise _failed("Could not set 'auth_client_required'", exc) from None
        cluster.conf_set("rbd_cache", "true" if cache else "false")
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


async def connect(options: BlockdevOptionsRbd, objects: Mapping[str, object],
                  cache: bool) -> tuple[Any, Any]:
    """QEMU's qemu_rbd_connect(): the cluster connection and the context of the pool
    (and namespace) ``options`` name, with QEMU's texts for each failure."""
    rados, rbd = _bindings()
    cluster = _configure(rados, options, objects, cache)
    ioctx = None
    try:
        try:
            await in_pool(cluster.connect)
        except Exception as exc:
            raise _failed("error connecting", exc) from None
        try:
            ioctx = await in_pool(cluster.open_ioctx, options.pool)
        except Exception as exc:
            raise _failed(f"error opening pool {options.pool}", exc) from None
        namespace = options.namespace or ""
        if namespace:
            try:
                exists = await in_pool(rbd.RBD().namespace_exists, ioctx, namespace)
            except rbd.Error as exc:
                raise _failed("error checking namespace", exc) from None
            if not exists:
                raise QMPError(f"namespace '{namespace}' does not exist")
        ioctx.set_namespace(namespace)
    except BaseException:
        if ioctx is not None:
            ioctx.close()
        cluster.shutdown()
        raise
    return cluster, ioctx


async def create_rbd(opts: BlockdevCreateOptionsRbd, graph: Any) -> None:
    """blockdev-create for ``rbd`` (QEMU's qemu_rbd_do_create): a new image of ``size``
    bytes in objects of ``cluster-size`` (librbd's default, 4 MiB, without it)."""
    location = opts.location
    if location.snapshot is not None:
        raise QMPError("Can't use snapshot name for image creation")
    if opts.encrypt is not None:
        raise QMPError("RBD library does not support image encryption")
    order = None
    if opts.cluster_size is not None:
        size = opts.cluster_size
        if size & (size - 1):
            raise QMPError("obj size needs to be power of 2")
        if size < 4096:
            raise QMPError("obj size too small")
        order = size.bit_length() - 1
    rbd = _bindings()[1]
    cluster, ioctx = await connect(location, graph.objects, cache=False)
    try:
        await in_pool(rbd.RBD().create, ioctx, location.image, opts.size, order)
    except rbd.Error as exc:
        raise _failed("error rbd create", exc) from None
    finally:
        ioctx.close()
        cluster.shutdown()


@register("rbd", options=BlockdevOptionsRbd, create=create_rbd)
class RbdNode(BlockNode):
    is_protocol = True
    strong_options = ("pool", "namespace", "image", "conf", "snapshot", "user", "server")

    rbd: Any = None         # the binding module
    cluster: Any = None
    ioctx: Any = None
    image: Any = None
    image_name = ""
    snapshot: str | None = None
    image_size = 0
    object_size = 0

    async def open(self, options: BlockdevOptionsRbd, children: ChildOpener) -> None:
        """qemu_rbd_open(): connect, open the image, check it; QEMU's texts and order."""
        rbd = self.rbd = _bindings()[1]
        self.cluster, self.ioctx = await connect(options, children.objects,
                                                 cache=not self.opts.cache_direct)
        try:
            self.image_name = options.image
            self.snapshot = options.snapshot
            try:
                self.image = await in_pool(rbd.Image, self.ioctx, options.image,
                                           options.snapshot)
            except rbd.Error as exc:
                raise _failed(f"error reading header from {options.image}", exc) from None
            if options.encrypt is not None:
                raise QMPError("RBD library does not support image encryption")
            try:
                info = await in_pool(self.image.stat)
            except rbd.Error as exc:
                raise _failed(f"error getting image info from {options.image}",
                              exc) from None
            self.image_size = info["size"]
            self.object_size = info["obj_size"]
            if self.snapshot is not None and not self.read_only:
                if not self.opts.auto_read_only:
                    raise QMPError("rbd snapshots are read-only")
                self.read_only = True
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """rbd_close() writes back librbd's cache; then the pool context and the cluster
        connection go."""
        image, ioctx, cluster = self.image, self.ioctx, self.cluster
        self.image = self.ioctx = self.cluster = None
        if image is not None:
            image.close()
        if ioctx is not None:
            ioctx.close()
        if cluster is not None:
            cluster.shutdown()

    # ---- what the node is ---------------------------------------------------------------

    def get_length(self) -> int:
        """Asks librbd each time, as QEMU does: another client may have resized it."""
        self.image_size = self.image.size()
        return self.image_size

    def allocated_size(self) -> int:
        """librbd has no cheap answer; QEMU's rbd driver gives none either."""
        return -errno.ENOTSUP

    def has_info(self) -> bool:
        return True

    def get_info(self) -> dict[str, object]:
        return {"cluster-size": self.object_size, "dirty-flag": False}

    def format_specific(self) -> dict[str, object] | None:
        """The encryption format, from the first bytes of the image (as QEMU probes)."""
        data: dict[str, object] = {}
        if self.image_size >= 8:
            found = _LUKS_MAGIC.get(bytes(self.image.read(0, 8)))
            if found is not None:
                data["encryption-format"] = found
        return {"type": "rbd", "data": data}

    def snapshot_list(self) -> list[dict[str, object]]:
        """rbd snapshots by name (their id too), with the image size they keep as
        vm-state-size and no times, as QEMU's qemu_rbd_snap_list() fills them in."""
        return [{"id": snap["name"], "name": snap["name"], "vm-state-size": snap["size"],
                 "date-sec": 0, "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0,
                 "icount": 0} for snap in self.image.list_snaps()]

    # ---- requests -------------------------------------------------------------------------

    async def _request(self, cmd: int, offset: int, length: int, flags: int,
                       submit: Callable[[Callable[..., None]], object]) -> tuple[int, Any]:
        """Starts one librbd AIO request and waits for its completion in this loop;
        failures are reported on stderr as QEMU does and raised as OSError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, Any]] = loop.create_future()

        def complete(completion: Any, data: Any = None) -> None:
            # A librbd thread: hand the result over, nothing else.
            try:
                loop.call_soon_threadsafe(_settle, future, completion.get_return_value(),
                                          data)
            except RuntimeError:
                pass        # the loop is gone: nobody waits for this request any more

        try:
            submit(complete)
        except Exception as exc:
            code = _errno(exc)
            error_report(f"rbd request failed early: cmd {cmd} offset {offset} bytes "
                         f"{length} flags {flags} r {-code} ({os.strerror(code)})")
            raise OSError(code, os.strerror(code)) from None
        ret, data = await future
        if ret < 0:
            error_report(f"rbd request failed: cmd {cmd} offset {offset} bytes {length} "
                         f"flags {flags} task.ret {ret} ({os.strerror(-ret)})")
            raise OSError(-ret, os.strerror(-ret))
        return ret, data

    async def _grow_for(self, end: int) -> None:
        """librbd refuses writes past the end: growing writes resize first (QEMU too)."""
        if end > self.image_size:
            await in_pool(self.image.resize, end)
            self.image_size = end

    async def do_read(self, offset: int, length: int) -> bytes:
        image = self.image
        ret, data = await self._request(
            _READ, offset, length, 0, lambda done: image.aio_read(offset, length, done))
        if ret < length:
            # Short reads are zero-padded (the buffer past ``ret`` is not cleared).
            return bytes(data[:ret]) + bytes(length - ret)
        return cast(bytes, data)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        image = self.image
        buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        await self._grow_for(offset + len(buf))
        await self._request(_WRITE, offset, len(buf), 0,
                            lambda done: image.aio_write(buf, offset, done))
        if fua:
            await self.do_flush()

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        """librbd writes zeroes itself, efficiently (QEMU: no fallback ever needed);
        without may_unmap it allocates them (thick provisioning)."""
        image = self.image
        flags = (_REQ_MAY_UNMAP if may_unmap else 0) | (_REQ_NO_FALLBACK if no_fallback
                                                         else 0)
        zero_flags = 0 if may_unmap else self.rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        await self._grow_for(offset + length)
        await self._request(_WRITE_ZEROES, offset, length, flags,
                            lambda done: image.aio_write_zeroes(offset, length, done,
                                                                zero_flags))
        if fua:
            await self.do_flush()

    async def do_discard(self, offset: int, length: int) -> None:
        image = self.image
        await self._request(_DISCARD, offset, length, 0,
                            lambda done: image.aio_discard(offset, length, done))

    async def do_flush(self) -> None:
        image = self.image
        await self._request(_FLUSH, 0, 0, 0, lambda done: image.aio_flush(done))

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        if prealloc != "off":
            raise OSError(errno.ENOTSUP, f"Unsupported preallocation mode '{prealloc}'")
        try:
            await in_pool(self.image.resize, length)
        except Exception as exc:
            code = _errno(exc)
            raise OSError(code, f"Failed to resize file: {os.strerror(code)}") from None
        self.image_size = length

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        """Allocated or a hole, from librbd's object map (QEMU's qemu_rbd_co_block_status):
        only where the image has a valid fast-diff map; anything else is data."""
        found = await in_pool(self._diff, offset, length)
        if found is None:
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset, self)
        exists, count = found
        flags = BLOCK_DATA if exists else BLOCK_ZERO
        return BlockStatus(flags | BLOCK_OFFSET_VALID, count, offset, self)

    def _diff(self, offset: int, length: int) -> tuple[bool, int] | None:
        """Whether ``offset`` is allocated and for how many bytes (pool thread), by
        whole objects; None when librbd cannot tell."""
        rbd = self.rbd
        image = self.image
        try:
            if not image.features() & rbd.RBD_FEATURE_FAST_DIFF:
                return None
            if image.flags() & rbd.RBD_FLAG_FAST_DIFF_INVALID:
                return None
            head = 0
            if tuple(rbd.RBD().version()) < _DIFF_OFFSET_FIXED:
                if image.features() & rbd.RBD_FEATURE_STRIPINGV2:
                    return None
                try:
                    image.parent_info()
                    return None          # a clone
                except rbd.ImageNotFound:
                    pass
                head = offset & (self.object_size - 1)
        except rbd.Error:
            return None
        start, end = offset - head, offset + length
        # The first allocated range decides; a hole before it or a gap after it ends the
        # answer (extents come in order, whole objects).
        state = {"exists": False, "end": start}

        def extent(off: int, size: int, exists: bool) -> int:
            if not exists:
                return 0
            if not state["exists"]:
                if off > start:
                    state["end"] = off
                    return _STOP
                state["exists"] = True
            elif off > state["end"]:
                return _STOP
            state["end"] = off + size
            return 0

        try:
            image.diff_iterate(start, end - start, None, extent, include_parent=True,
                               whole_object=True)
        except rbd.Error as exc:
            if _errno(exc) != -_STOP:
                return None
        stop = min(int(state["end"]), end) if state["exists"] or state["end"] > start \
            else end
        if stop <= offset:
            return None
        return bool(state["exists"]), stop - offset
