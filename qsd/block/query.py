"""What the block queries answer: query-named-block-nodes, query-blockstats and
x-debug-query-block-graph.

Members in QAPI schema order (the encoder puts them in QDict order on the wire), with
the optional ones exactly where 11.1.3 has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from qsd.block.node import BlockNode, Child
from qsd.block.permissions import ChildRole, qapi_perm_list
from qsd.errors import QMPError

if TYPE_CHECKING:
    from qsd.block.graph import BlockGraph


def image_info(node: BlockNode, flat: bool) -> dict[str, object]:
    """QAPI ImageInfo of one node and, unless ``flat``, of the chain below it (the
    filtered or backing child as ``backing-image``, as QEMU's bdrv_query_image_info)."""
    image: dict[str, object] = {
        "filename": node.filename,
        "format": node.driver,
    }
    if node.has_info():
        image.update(node.get_info())
    allocated = node.allocated_size()
    if allocated >= 0:
        image["actual-size"] = allocated
    image["virtual-size"] = node.length()
    snapshots = node.snapshot_list()
    if snapshots:
        image["snapshots"] = snapshots
    if node.backing_file:
        image["backing-filename"] = node.backing_file
        image["full-backing-filename"] = node.full_backing_filename()
        if node.backing_format:
            image["backing-filename-format"] = node.backing_format
    image["limits"] = node.bl.info()
    specific = node.format_specific()
    if specific is not None:
        image["format-specific"] = specific
    below = node.filter_or_cow_child()
    if not flat and below is not None:
        image["backing-image"] = image_info(below.node, flat)
    return image


def backing_file_depth(node: BlockNode) -> int:
    """Filtered and backing children down the chain (QEMU counts both)."""
    depth = 0
    below = node.filter_or_cow_child()
    while below is not None:
        depth += 1
        below = below.node.filter_or_cow_child()
    return depth


def block_device_info(node: BlockNode, flat: bool = False) -> dict[str, object]:
    """QAPI BlockDeviceInfo for query-named-block-nodes, members in schema order."""
    if node.ejected:
        raise QMPError(f"Block device {node.node_name} is ejected")
    info: dict[str, object] = {
        "file": node.filename,
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver,
    }
    cow = node.cow_child()
    if cow is not None:
        info["backing_file"] = cow.node.filename
    info["backing_file_depth"] = 0 if flat else backing_file_depth(node)
    info["children"] = [{"child": c.name, "node-name": c.node.node_name}
                        for c in node.children]
    info.update({
        "active": True,
        "encrypted": False,
        "detect_zeroes": node.opts.detect_zeroes,
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image_info(node, flat),
        "cache": {"writeback": True, "direct": node.opts.cache_direct,
                  "no-flush": node.opts.cache_no_flush},
        "write_threshold": 0,
    })
    if node.dirty_bitmaps:
        info["dirty-bitmaps"] = [bitmap.info() for bitmap in node.dirty_bitmaps]
    return info


# BlockDeviceStats members a node leaves at zero: QEMU counts them per device only.
_DEVICE_COUNTERS = (
    "rd_bytes", "wr_bytes", "zone_append_bytes", "unmap_bytes", "rd_operations",
    "wr_operations", "zone_append_operations", "flush_operations", "unmap_operations",
    "rd_total_time_ns", "wr_total_time_ns", "zone_append_total_time_ns",
    "flush_total_time_ns", "unmap_total_time_ns", "rd_merged", "wr_merged",
    "zone_append_merged", "unmap_merged", "failed_rd_operations", "failed_wr_operations",
    "failed_zone_append_operations", "failed_flush_operations", "failed_unmap_operations",
    "invalid_rd_operations", "invalid_wr_operations", "invalid_zone_append_operations",
    "invalid_flush_operations", "invalid_unmap_operations",
)


def query_blockstats(graph: BlockGraph, query_nodes: bool) -> list[dict[str, object]]:
    """QAPI BlockStats: per device (a storage daemon has none: its exports' backends
    are anonymous, so QEMU's list is empty too) or, with ``query_nodes``, per node in
    creation order."""
    if not query_nodes:
        return []
    return [node_stats(node) for node in graph.opened_nodes()]


def node_stats(node: BlockNode) -> dict[str, object]:
    """QEMU's bdrv_query_bds_stats() for a node: its highest write, the driver's own
    numbers, and the node that stores its data as ``parent``."""
    stats: dict[str, object] = dict.fromkeys(_DEVICE_COUNTERS, 0)
    stats.update({"wr_highest_offset": node.wr_highest_offset, "account_invalid": False,
                  "account_failed": False, "timed_stats": []})
    info: dict[str, object] = {"node-name": node.node_name, "stats": stats}
    specific = node.specific_stats()
    if specific is not None:
        info["driver-specific"] = specific
    below = _data_child(node)
    if below is not None:
        info["parent"] = node_stats(below.node)
    return info


def _data_child(node: BlockNode) -> Child | None:
    """The primary child when it holds data or is filtered, else the only data child."""
    primary = node.primary_child()
    if primary is not None and primary.role & (ChildRole.DATA | ChildRole.FILTERED):
        return primary
    data = [c for c in node.children if c.role & ChildRole.DATA]
    return data[0] if len(data) == 1 else None


def query_named_block_nodes(graph: BlockGraph, flat: bool = False) -> list[dict[str, object]]:
    """Newest first, like QEMU (its list is built by prepending)."""
    return [block_device_info(n, flat) for n in reversed(graph.opened_nodes())]


class GraphJob(Protocol):
    """A block job as the debug graph shows it: its id and its edges into nodes."""

    id: str | None
    nodes: list[Child]


def x_debug_query_block_graph(graph: BlockGraph, jobs: Sequence[GraphJob] = ()
                              ) -> dict[str, object]:
    """XDbgBlockGraph with QEMU's numbering: backends, block jobs (newest first), then
    nodes in creation order; ids are assigned on first sight and both lists come out
    reversed (prepended)."""
    ids: dict[int, int] = {}
    nodes: list[dict[str, object]] = []
    edges: list[dict[str, object]] = []

    def num(obj: object) -> int:
        return ids.setdefault(id(obj), len(ids) + 1)

    def add_edges(parent: object, children: list[Child]) -> None:
        for child in children:
            edges.append({"parent": num(parent), "child": num(child.node),
                          "name": child.name,
                          "perm": qapi_perm_list(child.perm),
                          "shared-perm": qapi_perm_list(child.shared)})

    for blk in graph.backends:
        nodes.append({"id": num(blk), "type": "block-backend", "name": ""})
        add_edges(blk, [blk.root] if blk.root is not None else [])
    for job in jobs:
        nodes.append({"id": num(job), "type": "block-job", "name": job.id or ""})
        add_edges(job, job.nodes)
    for node in graph.opened_nodes():
        nodes.append({"id": num(node), "type": "block-driver", "name": node.node_name})
        add_edges(node, node.children)
    return {"nodes": nodes[::-1], "edges": edges[::-1]}
