"""QEMU's one rule for ids that users choose (``id_wellformed()`` in util/id.c).

Chardevs given on the command line, objects (iothreads), block exports and node names
all follow it; QMP's chardev-add does not check it, as in QEMU.
"""

from __future__ import annotations

import re

_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")

# QemuOpts and object-add append this hint where the command line shows it.
ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."


def id_wellformed(text: str) -> bool:
    """A letter first, then letters, digits, '-', '.' or '_' (ASCII only)."""
    return _WELL_FORMED.match(text) is not None
