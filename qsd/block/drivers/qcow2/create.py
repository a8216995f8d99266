"""blockdev-create for qcow2 (QEMU's qcow2_co_create: its checks, order and texts).

The options are checked first, in QEMU's order.  Then the empty image that
``format.new_image`` lays out (header cluster, refcount table, one refcount block) is
written to the file node, the image is opened with the qcow2 driver and truncated to its
size with the preallocation asked for, and a backing file is recorded in the header last,
as QEMU does; the temporary qcow2 node is flushed and closed before the job completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any

from qsd.block import io
from qsd.block.drivers.qcow2 import format as fmt
from qsd.block.graph import BlockGraph
from qsd.block.permissions import PERM_RESIZE, PERM_WRITE
from qsd.errors import QMPError
from qsd.qapi.generated import BlockdevCreateOptionsQcow2

_V3_HINT = "(use version=v3 or greater)"


def _enum(value: Any, default: str) -> str:
    return str(value.value) if value is not None else default


def _check(opts: BlockdevCreateOptionsQcow2) -> tuple[int, int, str]:
    """The options' checks before any node is touched, in QEMU's order; returns the
    version, the cluster size and the preallocation mode to use."""
    if opts.size % 512:
        raise QMPError("Image size must be a multiple of 512 bytes")
    version = 2 if _enum(opts.version, "v3") == "v2" else 3
    cluster_size = opts.cluster_size if opts.cluster_size is not None \
        else fmt.DEFAULT_CLUSTER_SIZE
    extended_l2 = bool(opts.extended_l2)
    if extended_l2 and version < 3:
        raise QMPError("Extended L2 entries are only supported with compatibility level "
                       f"1.1 and above {_V3_HINT}")
    if (cluster_size & (cluster_size - 1) or
            not 1 << fmt.MIN_CLUSTER_BITS <= cluster_size <= 1 << fmt.MAX_CLUSTER_BITS):
        raise QMPError(f"Cluster size must be a power of two between "
                       f"{1 << fmt.MIN_CLUSTER_BITS} and "
                       f"{1 << (fmt.MAX_CLUSTER_BITS - 10)}k")
    min_extl2 = (1 << fmt.MIN_CLUSTER_BITS) * fmt.SUBCLUSTERS
    if extended_l2 and cluster_size < min_extl2:
        raise QMPError("Extended L2 entries are only supported with cluster sizes of at "
                       f"least {min_extl2} bytes")
    prealloc = _enum(opts.preallocation, "off")
    if opts.backing_file is not None and prealloc != "off" and not extended_l2:
        raise QMPError("Backing file and preallocation can only be used at the same time "
                       "if extended_l2 is on")
    if opts.backing_fmt is not None and opts.backing_file is None:
        raise QMPError("Backing format cannot be used without backing file")
    if version < 3 and opts.lazy_refcounts:
        raise QMPError("Lazy refcounts only supported with compatibility level 1.1 and "
                       f"above {_V3_HINT}")
    bits = opts.refcount_bits if opts.refcount_bits is not None else 16
    if not 0 < bits <= 64 or bits & (bits - 1):
        raise QMPError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise QMPError("Different refcount widths than 16 bits require compatibility "
                       f"level 1.1 or above {_V3_HINT}")
    if opts.data_file_raw and opts.data_file is None:
        raise QMPError("data-file-raw requires data-file")
    if opts.data_file_raw and opts.backing_file is not None:
        raise QMPError("Backing file and data-file-raw cannot be used at the same time")
    if opts.data_file_raw and prealloc == "off":
        # A raw data file must read as the image without the metadata, so the L2
        # tables have to map it one to one from the start.
        prealloc = "metadata"
    return version, cluster_size, prealloc


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno or 0)


async def create_qcow2(opts: BlockdevCreateOptionsQcow2, graph: BlockGraph) -> None:
    async with contextlib.AsyncExitStack() as stack:
        file_node = await stack.enter_async_context(graph.blockdev_ref(opts.file))
        version, cluster_size, prealloc = _check(opts)
        data_node = None
        if opts.data_file is not None:
            if version < 3:
                raise QMPError("External data files are only supported with compatibility "
                               f"level 1.1 and above {_V3_HINT}")
            data_node = await stack.enter_async_context(graph.blockdev_ref(opts.data_file))
        compression = _enum(opts.compression_type, "zlib")
        if compression != "zlib" and version < 3:
            raise QMPError("Non-zlib compression type is only supported with "
                           f"compatibility level 1.1 and above {_V3_HINT}")
        image = fmt.new_image(
            cluster_size=cluster_size, version=version,
            refcount_bits=opts.refcount_bits if opts.refcount_bits is not None else 16,
            lazy_refcounts=bool(opts.lazy_refcounts), extended_l2=bool(opts.extended_l2),
            compression_type=compression,
            data_file=data_node.filename if data_node is not None else None,
            data_file_raw=bool(opts.data_file_raw))
        with graph.temporary_user(file_node, PERM_WRITE | PERM_RESIZE) as child:
            try:
                await io.write(child, 0, image[:cluster_size])
            except OSError as exc:
                raise QMPError(f"Could not write qcow2 header: {_strerror(exc)}") from None
            try:
                await io.write(child, cluster_size, image[cluster_size:])
            except OSError as exc:
                raise QMPError(f"Could not write refcount table: {_strerror(exc)}") from None
        definition: dict[str, object] = {"driver": "qcow2", "file": file_node.node_name,
                                         "backing": None}
        if data_node is not None:
            definition["data-file"] = data_node.node_name
        qcow2 = await stack.enter_async_context(graph.blockdev_ref(definition))
        with graph.temporary_user(qcow2, PERM_WRITE | PERM_RESIZE) as child:
            try:
                await io.truncate(child, opts.size, False, prealloc)
            except OSError as exc:
                raise QMPError(f"Could not resize image: {exc.strerror}") from None
            if opts.backing_file is not None:
                backing_format = _enum(opts.backing_fmt, "")
                await _change_backing_file(qcow2, opts.backing_file, backing_format)
            # QEMU flushes when it closes the image and ignores a failure there too.
            with contextlib.suppress(OSError):
                await io.flush(child)


async def _change_backing_file(node: Any, name: str, backing_format: str) -> None:
    """Records the backing file in the header (QEMU's qcow2_change_backing_file)."""
    try:
        if len(name.encode()) > fmt.MAX_BACKING_FILE_NAME:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        node.backing_file, node.backing_format = name, backing_format
        await node.update_header()
    except OSError as exc:
        raise QMPError(f"Could not assign backing file '{name}' with format "
                       f"'{backing_format or '(null)'}': {_strerror(exc)}") from None
