"""Mounting and unmounting a FUSE file system on a regular file, as libfuse does it.

QEMU lets libfuse mount (``fuse_session_mount()``) and unmount; qsd does what libfuse
does without linking it: as root ``mount(2)`` with the /dev/fuse fd in the options, and
otherwise the setuid helper ``fusermount3``, which mounts and hands the fd back over a
socket (``_FUSE_COMMFD``, SCM_RIGHTS).  Every function here blocks; callers on an event
loop run them in a worker thread, so that a path lookup that ends up in one of our own
mounts cannot deadlock the loop that would have to answer it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct
import subprocess
import sys

from qsd.errors import QMPError
from qsd.export.fuse import protocol as P

# QEMU's FUSE_MAX_READ_BYTES: MIN(BDRV_REQUEST_MAX_BYTES, 1 MiB); a mount option.
MAX_READ_BYTES = 1024 * 1024

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOATIME = 1024
MNT_DETACH = 2

FUSERMOUNT = "fusermount3"

# The C library is already in the process: find_library would run ldconfig to find it.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class FuseMount:
    """A mounted FUSE file system: its session fd and how to take it down again."""

    def __init__(self, mountpoint: str, fd: int, *, via_fusermount: bool) -> None:
        self.mountpoint = mountpoint
        self.fd = fd
        self.via_fusermount = via_fusermount

    def unmount(self) -> None:
        """Lazily detaches the mount, like libfuse's ``fuse_kern_unmount()``.

        The session fd stays open: the owner closes it afterwards, which aborts the
        connection so that requests still queued in the kernel fail instead of hanging.
        """
        if not self.via_fusermount:
            if _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH) == 0:
                return
        import shutil  # here: a daemon that mounts by itself never needs it

        fusermount = shutil.which(FUSERMOUNT)
        if fusermount is not None:
            subprocess.run([fusermount, "-u", "-q", "-z", "--", self.mountpoint],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)


def mount_options(writable: bool, allow_other: bool) -> str:
    """The option string QEMU hands to libfuse (and libfuse to ``fusermount3``)."""
    return (f"{'rw' if writable else 'ro'},nosuid,nodev,noatime,max_read={MAX_READ_BYTES},"
            f"default_permissions{',allow_other' if allow_other else ''}")


def kernel_options(fd: int, rootmode: int, allow_other: bool) -> str:
    """The ``data`` of a direct ``mount(2)``: what libfuse's ``fuse_mount_sys()`` builds
    (the MS_* flags nosuid, nodev, noatime and ro travel separately)."""
    return (f"fd={fd},rootmode={rootmode:o},user_id={os.getuid()},group_id={os.getgid()},"
            f"max_read={MAX_READ_BYTES},default_permissions"
            f"{',allow_other' if allow_other else ''}")


def mount(mountpoint: str, *, writable: bool, allow_other: bool, quiet: bool) -> FuseMount:
    """Mounts a FUSE file system on ``mountpoint`` and returns its session.

    Like libfuse, try ``mount(2)`` first and fall back to ``fusermount3`` when that is not
    permitted.  ``quiet`` suppresses the helper's complaints (QEMU's first ``allow_other``
    attempt in auto mode ignores its errors).  Raises QEMU's error on failure.
    """
    try:
        rootmode = stat.S_IFMT(os.stat(mountpoint).st_mode)
    except OSError as e:
        raise QMPError("Failed to mount FUSE session to export") from e
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if not quiet:
            print(f"fuse: failed to open /dev/fuse: {os.strerror(e.errno or 0)}",
                  file=sys.stderr)
        raise QMPError("Failed to mount FUSE session to export") from e
    flags = MS_NOSUID | MS_NODEV | MS_NOATIME | (0 if writable else MS_RDONLY)
    data = kernel_options(fd, rootmode, allow_other)
    if _libc.mount(b"/dev/fuse", os.fsencode(mountpoint), b"fuse", flags,
                   data.encode()) == 0:
        return FuseMount(mountpoint, fd, via_fusermount=False)
    err = ctypes.get_errno()
    os.close(fd)
    if err != errno.EPERM:
        if not quiet:
            print(f"fuse: mount failed: {os.strerror(err)}", file=sys.stderr)
        raise QMPError("Failed to mount FUSE session to export")
    return mount_fusermount(mountpoint, writable=writable, allow_other=allow_other,
                            quiet=quiet)


def mount_fusermount(mountpoint: str, *, writable: bool, allow_other: bool,
                     quiet: bool) -> FuseMount:
    """Mounts through the setuid ``fusermount3``, receiving the session fd over a socket
    (libfuse's ``fuse_mount_fusermount()``); the path for unprivileged daemons."""
    import shutil  # here: a daemon that mounts by itself never needs it

    fusermount = shutil.which(FUSERMOUNT)
    if fusermount is None:
        if not quiet:
            print(f"fuse: failed to exec {FUSERMOUNT}: No such file or directory",
                  file=sys.stderr)
        raise QMPError("Failed to mount FUSE session to export")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        child = subprocess.Popen(
            [fusermount, "-o", mount_options(writable, allow_other), "--", mountpoint],
            env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if quiet else None)
        theirs.close()
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        child.wait()
    if not fds:
        raise QMPError("Failed to mount FUSE session to export")
    for extra in fds[1:]:
        os.close(extra)
    os.set_inheritable(fds[0], False)
    return FuseMount(mountpoint, fds[0], via_fusermount=True)


def clone_fd(fd: int) -> int:
    """A second /dev/fuse fd on the same connection (one per queue), non-blocking.

    Raises QEMU's errors: ``Failed to open /dev/fuse: ...``, ``Failed to clone FUSE FD:
    ...``.
    """
    try:
        new_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise QMPError(f"Failed to open /dev/fuse: {os.strerror(e.errno or errno.EIO)}") from e
    try:
        fcntl.ioctl(new_fd, P.FUSE_DEV_IOC_CLONE, struct.pack("=I", fd))
    except OSError as e:
        os.close(new_fd)
        raise QMPError(f"Failed to clone FUSE FD: {os.strerror(e.errno or errno.EIO)}") from e
    return new_fd


def set_nonblocking(fd: int) -> None:
    """Makes the session fd non-blocking so the request loop can drain it to EAGAIN."""
    try:
        os.set_blocking(fd, False)
    except OSError as e:
        raise QMPError("Failed to make FUSE FD non-blocking: "
                       f"{os.strerror(e.errno or errno.EIO)}") from e
