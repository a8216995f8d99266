"""block-export-add, block-export-del, query-block-exports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.commands.registry import command
from qsd.qapi.generated import BlockExportDelArgs, BlockExportOptions

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("block-export-add")
async def block_export_add(daemon: Daemon, args: BlockExportOptions) -> None:
    await daemon.exports.add(args)


@command("block-export-del")
async def block_export_del(daemon: Daemon, args: BlockExportDelArgs) -> None:
    await daemon.exports.delete(args.id, "safe" if args.mode is None else args.mode.value)


@command("query-block-exports")
async def query_block_exports(daemon: Daemon, args: None) -> list[dict[str, object]]:
    return daemon.exports.query()
