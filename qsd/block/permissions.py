"""Block permissions: what each user of a node takes and what it lets others take.

The model is QEMU's: every edge into a node (a BlockBackend's ``root`` or a parent node's
``file`` child) carries ``perm`` (what the user needs) and ``shared`` (what it tolerates in
others).  A node's cumulative permissions are the union of its parents' ``perm`` and the
intersection of their ``shared``; a change is refused when one parent needs something
another does not share, with QEMU's error text, so that management tools see the same
conflicts as with QEMU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qsd.errors import QMPError

if TYPE_CHECKING:
    from qsd.block.node import BlockNode

PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_ALL = 0x0F
PERM_MAX = 4

# Names in the QAPI BlockPermission enum (x-debug-query-block-graph) ...
QAPI_NAMES = ("consistent-read", "write", "write-unchanged", "resize")
# ... and in error messages (QEMU's bdrv_perm_names()).
_TEXT_NAMES = ("consistent read", "write", "write unchanged", "resize")


def perm_names(perm: int) -> str:
    """Permissions as QEMU lists them in errors: ``'write, resize'``."""
    return ", ".join(name for bit, name in enumerate(_TEXT_NAMES) if perm & (1 << bit))


def qapi_perm_list(perm: int) -> list[str]:
    """Permissions as x-debug-query-block-graph lists them (QEMU prepends: highest first)."""
    return [QAPI_NAMES[bit] for bit in reversed(range(PERM_MAX)) if perm & (1 << bit)]


class Edge:
    """One user of a node: QEMU's BdrvChild.

    ``describe`` gives the parent's description for error messages (QEMU's
    ``get_parent_desc``): ``an unnamed block device`` for a BlockBackend, ``node 'X'``
    for a parent node.
    """

    __slots__ = ("name", "node", "perm", "shared", "describe", "parent_node")

    def __init__(self, name: str, node: BlockNode, describe: Callable[[], str],
                 parent_node: BlockNode | None = None) -> None:
        self.name = name
        self.node = node
        self.perm = 0
        self.shared = PERM_ALL
        self.describe = describe
        self.parent_node = parent_node


def _conflict(a: Edge, b: Edge, perm_b: int, shared_a: int) -> QMPError | None:
    """QEMU's bdrv_a_allow_b(): does ``a`` share everything ``b`` needs?"""
    if perm_b & shared_a == perm_b:
        return None
    node = a.node.node_name
    return QMPError(
        f"Permission conflict on node '{node}': permissions '{perm_names(perm_b & ~shared_a)}'"
        f" are both required by {b.describe()} (uses node '{node}' as '{b.name}' child) and"
        f" unshared by {a.describe()} (uses node '{node}' as '{a.name}' child).")


def refresh(node: BlockNode, changes: dict[Edge, tuple[int, int]]) -> None:
    """Applies new (perm, shared) values to edges of ``node`` and propagates downwards.

    Either every node below accepts (parents compatible, write access only on writable
    nodes, file locks obtained) and everything is committed, or nothing changes and the
    first error is raised: QEMU's transactional bdrv_refresh_perms().
    """
    plan: dict[Edge, tuple[int, int]] = dict(changes)
    prepared: list[BlockNode] = []
    try:
        _check_node(node, plan, prepared)
    except QMPError:
        for n in reversed(prepared):
            n.abort_perm()
        raise
    for n in prepared:
        n.commit_perm()
    for edge, (perm, shared) in plan.items():
        edge.perm, edge.shared = perm, shared


def _values(edge: Edge, plan: dict[Edge, tuple[int, int]]) -> tuple[int, int]:
    return plan.get(edge, (edge.perm, edge.shared))


def cumulative(node: BlockNode, plan: dict[Edge, tuple[int, int]] | None = None
               ) -> tuple[int, int]:
    """The union of the parents' perm and the intersection of their shared permissions."""
    perm, shared = 0, PERM_ALL
    for edge in node.parents:
        p, s = plan.get(edge, (edge.perm, edge.shared)) if plan else (edge.perm, edge.shared)
        perm |= p
        shared &= s
    return perm, shared


def _check_node(node: BlockNode, plan: dict[Edge, tuple[int, int]],
                prepared: list[BlockNode]) -> None:
    parents = node.parents
    for a in parents:
        shared_a = _values(a, plan)[1]
        for b in parents:
            if a is not b:
                error = _conflict(a, b, _values(b, plan)[0], shared_a)
                if error is not None:
                    raise error
    perm, shared = cumulative(node, plan)
    if perm & (PERM_WRITE | PERM_WRITE_UNCHANGED) and node.read_only:
        raise QMPError("Block node is read-only")
    node.check_perm(perm, shared)
    prepared.append(node)
    for child in node.children:
        nperm, nshared = node.child_perm(child, perm, shared)
        if child.node.force_share:
            nshared = PERM_ALL
        if (nperm, nshared) != _values(child, plan) or child in plan:
            plan[child] = (nperm, nshared)
            _check_node(child.node, plan, prepared)
