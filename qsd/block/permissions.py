"""Block permissions and child roles: what each user of a node takes and lets others take.

The model is QEMU's: every child edge into a node carries ``perm`` (what the user needs)
and ``shared`` (what it tolerates in others).  A node's cumulative permissions are the
union of its parents' ``perm`` and the intersection of their ``shared``; a change is
refused when one parent needs something another does not share, with QEMU's error text,
so that management tools see the same conflicts as with QEMU.  The graph module applies
changes (``BlockGraph`` in graph.py); this module only knows the bits, their names and
what a parent passes on to a child by default, by the child's role.
"""

from __future__ import annotations

import enum

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

# What a filter passes through unchanged (QEMU's DEFAULT_PERM_PASSTHROUGH).
_PASSTHROUGH = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE


class ChildRole(enum.IntFlag):
    """What a child is to its parent (QEMU's BdrvChildRole)."""

    DATA = 0x01          # guest data is stored here
    METADATA = 0x02      # the parent's format metadata is stored here
    FILTERED = 0x04      # the parent presents this child's data unchanged
    COW = 0x08           # backing: data the parent has not overwritten comes from here
    PRIMARY = 0x10       # the child whose filename stands for the parent's
    IMAGE = DATA | METADATA


def perm_names(perm: int) -> str:
    """Permissions as QEMU lists them in errors: ``'write, resize'``."""
    return ", ".join(name for bit, name in enumerate(_TEXT_NAMES) if perm & (1 << bit))


def qapi_perm_list(perm: int) -> list[str]:
    """Permissions as x-debug-query-block-graph lists them (QEMU prepends: highest first)."""
    return [QAPI_NAMES[bit] for bit in reversed(range(PERM_MAX)) if perm & (1 << bit)]


def default_child_perm(role: ChildRole, perm: int, shared: int,
                       writable: bool) -> tuple[int, int]:
    """What a parent with cumulative (perm, shared) needs from a child in ``role``.

    QEMU's bdrv_default_perms(): filters pass everything through; a backing (COW) child
    is only read; a data or metadata child is read consistently, written when the parent
    writes (metadata: whenever the parent is writable), and nobody else may resize it.
    """
    if role & ChildRole.FILTERED:
        return perm & _PASSTHROUGH, shared & _PASSTHROUGH
    if role & ChildRole.COW:
        nperm = perm & PERM_CONSISTENT_READ
        nshared = (PERM_WRITE | PERM_RESIZE) if shared & PERM_WRITE else 0
        return nperm, nshared | PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
    nperm, nshared = perm & _PASSTHROUGH, shared & _PASSTHROUGH
    if role & ChildRole.METADATA:
        if writable:
            nperm |= PERM_WRITE | PERM_RESIZE
        nperm |= PERM_CONSISTENT_READ
        nshared &= ~(PERM_WRITE | PERM_RESIZE)
    if role & ChildRole.DATA:
        nshared &= ~PERM_RESIZE
        if nperm & PERM_WRITE_UNCHANGED:
            nperm |= PERM_WRITE
        if nperm & PERM_WRITE:
            nperm |= PERM_RESIZE
    return nperm, nshared
