"""QEMU's image locking: open file description (OFD) locks on single bytes.

QEMU marks each permission a node holds by a shared lock on byte ``100 + bit`` and each
permission it refuses to share by a shared lock on byte ``200 + bit``; a new user tests
with a write lock whether anybody holds the byte it conflicts with.  Using the same bytes
and the same error texts makes qsd, QEMU, qemu-img and qemu-io see each other's locks.
OFD locks belong to the open file description, so two nodes of one process on the same
file conflict just as two processes do, exactly like QEMU.
"""

from __future__ import annotations

import fcntl
import os
import struct

from qsd.block.permissions import PERM_MAX, perm_names
from qsd.errors import QMPError

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

_FLOCK = "hhxxxxqqixxxx"


class LockError(QMPError):
    """A lock conflict; ``hint`` is the line QEMU adds on the command line only."""

    def __init__(self, desc: str, hint: str) -> None:
        super().__init__(desc)
        self.hint = hint


def _fcntl(fd: int, cmd: int, lock_type: int, start: int) -> int:
    arg = struct.pack(_FLOCK, lock_type, os.SEEK_SET, start, 1, 0)
    result = fcntl.fcntl(fd, cmd, arg)
    return int(struct.unpack(_FLOCK, result)[0])


def lock_byte(fd: int, offset: int) -> None:
    _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)


def unlock_byte(fd: int, offset: int) -> None:
    _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)


def byte_is_locked(fd: int, offset: int) -> bool:
    """True when another open file description holds a lock on the byte."""
    return _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


class ImageLocks:
    """The lock bytes one file node holds, changed in QEMU's prepare/commit/abort steps."""

    def __init__(self, fd: int, filename: str) -> None:
        self.fd = fd
        self.filename = filename
        self.perm = 0          # bits whose 100+bit byte we hold
        self.unshared = 0      # bits whose 200+bit byte we hold
        self._saved: tuple[int, int] | None = None
        self._pending = (0, 0)

    def _apply(self, perm: int, unshared: int) -> None:
        """Holds exactly the bytes for ``perm``/``unshared`` (QEMU's raw_apply_lock_bytes)."""
        for bit in range(PERM_MAX):
            mask = 1 << bit
            for base, want, have in ((LOCK_PERM_BASE, perm, self.perm),
                                     (LOCK_SHARED_BASE, unshared, self.unshared)):
                if want & mask and not have & mask:
                    try:
                        lock_byte(self.fd, base + bit)
                    except OSError as exc:
                        raise QMPError(f"Failed to lock byte {base + bit}") from exc
                elif have & mask and not want & mask:
                    unlock_byte(self.fd, base + bit)
        self.perm, self.unshared = perm, unshared

    def _check(self, perm: int, shared: int) -> None:
        """Refuses when somebody else unshares what we need or needs what we unshare."""
        for bit in range(PERM_MAX):
            if perm & (1 << bit) and byte_is_locked(self.fd, LOCK_SHARED_BASE + bit):
                raise LockError(f'Failed to get "{perm_names(1 << bit)}" lock', self._hint())
        for bit in range(PERM_MAX):
            if not shared & (1 << bit) and byte_is_locked(self.fd, LOCK_PERM_BASE + bit):
                raise LockError(f'Failed to get shared "{perm_names(1 << bit)}" lock',
                                self._hint())

    def _hint(self) -> str:
        return f"Is another process using the image [{self.filename}]?"

    def prepare(self, perm: int, shared: int) -> None:
        """Takes the union of old and new locks, then checks others' locks against them."""
        self._saved = (self.perm, self.unshared)
        try:
            self._apply(self.perm | perm, self.unshared | (~shared & ((1 << PERM_MAX) - 1)))
            self._check(perm, shared)
        except QMPError:
            self.abort()
            raise
        self._pending = (perm, ~shared & ((1 << PERM_MAX) - 1))

    def commit(self) -> None:
        """Drops the locks the new permissions no longer need."""
        if self._saved is not None:
            self._apply(*self._pending)
            self._saved = None

    def abort(self) -> None:
        if self._saved is not None:
            saved, self._saved = self._saved, None
            self._apply(*saved)

    def release(self) -> None:
        self._apply(0, 0)
