"""The ``throttle`` filter driver: its ``file`` child's data, with every request first
let through by a throttle group (QEMU's block/throttle.c).

Reads count against the group's read limits; writes, zero-writes and discards against
its write limits, each by its length in bytes; flushes and block status are not limited.
A request the group holds back waits in the node's context without blocking the loop.
A drained node lets its held requests go at once (as QEMU does: drain must end), and
its member follows the node to another iothread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.block import io
from qsd.block.node import BlockNode, Child, ChildOpener, Data
from qsd.block.permissions import ChildRole
from qsd.block.registry import register
from qsd.block.throttle_groups import ThrottleGroupMember, find_group
from qsd.errors import QMPError
from qsd.qapi.generated import BlockdevOptionsThrottle

if TYPE_CHECKING:
    from qsd.aio import AioContext


@register("throttle", options=BlockdevOptionsThrottle)
class ThrottleNode(BlockNode):
    is_filter = True
    strong_options = ("throttle-group",)

    _file: Child | None = None
    member: ThrottleGroupMember | None = None

    async def open(self, options: BlockdevOptionsThrottle, children: ChildOpener) -> None:
        self._file = await children.open_child(self, options.file, "file",
                                               ChildRole.FILTERED | ChildRole.PRIMARY)
        group = find_group(options.throttle_group)
        if group is None:
            raise QMPError(f"Throttle group '{options.throttle_group}' does not exist")
        self.member = group.register(self.ctx)

    def close(self) -> None:
        if self.member is not None and self.member.group is not None:
            self.member.group.unregister(self.member)
        self.member = None

    def _child(self) -> Child:
        assert self._file is not None
        return self._file

    def _member(self) -> ThrottleGroupMember:
        assert self.member is not None
        return self.member

    async def do_read(self, offset: int, length: int) -> bytes:
        await self._member().intercept(length, False)
        return await io.read(self._child(), offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        await self._member().intercept(len(data), True)
        await io.write(self._child(), offset, data, fua)

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        await self._member().intercept(length, True)
        await io.write_zeroes(self._child(), offset, length, may_unmap, no_fallback, fua)

    async def do_discard(self, offset: int, length: int) -> None:
        await self._member().intercept(length, True)
        await io.discard(self._child(), offset, length)

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        await io.truncate(self._child(), length, exact, prealloc)

    def drained_begin(self) -> None:
        if self.member is not None:
            self.member.disable_limits()

    def drained_end(self) -> None:
        """(A node closed within the drained section has no member any more.)"""
        if self.member is not None:
            self.member.enable_limits()

    def attach_aio_context(self, ctx: AioContext) -> None:
        member = self._member()
        group = member.group
        assert group is not None
        group.detach_context(member)
        group.attach_context(member, ctx)
