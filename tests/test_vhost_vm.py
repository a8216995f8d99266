"""A real virtual machine on a vhost-user-blk export of qsd.

The test boots Debian's kernel under qemu-system-x86_64 (KVM where /dev/kvm is usable,
TCG otherwise) with an initramfs it builds from busybox-static; the guest's memory is a
shared memfd and its disk is ``vhost-user-blk-pci,num-queues=4`` on qsd's socket.  The
guest's init writes patterns with dd through /dev/vda from several CPUs (so through
several virtqueues), reads them back, discards a range, and prints an md5 of the whole
disk, which must be the host's md5 of the image.  A second guest is then started against
the same export after the first one's QEMU was killed, and finds everything in place.
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import wait_for_listener

MiB = 1024 * 1024
DISK_SIZE = 32 * MiB
QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = shutil.which("busybox")
KERNELS = sorted(glob.glob("/boot/vmlinuz-*"))

pytestmark = pytest.mark.skipif(
    QEMU is None or BUSYBOX is None or not KERNELS,
    reason="needs qemu-system-x86_64, busybox-static and linux-image-amd64 (make deps)")

# The guest: load the virtio modules, then work on /dev/vda and report on the console.
# The first boot writes (PHASE=write), the second checks what the first left (check).
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "QSD-VM: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
phase=$(sed -n 's/.*qsd.phase=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "QSD-VM: queues $(ls /sys/block/vda/mq | wc -l)"
if [ "$phase" = write ]; then
    # One writer per CPU, each pinned: the guest's blk-mq maps CPU n to virtqueue n.
    n=0
    for off in 0 1024 2048 3072; do
        head -c 1048576 /dev/urandom > /tmp/p$n
        taskset -c $n dd if=/tmp/p$n of=/dev/vda bs=4096 seek=$off conv=fsync 2>/dev/null &
        n=$((n + 1))
    done
    wait
    # A small unaligned write, and a long one.
    printf 'qsd vhost-user-blk' | dd of=/dev/vda bs=1 seek=22021096 conv=notrunc,fsync 2>/dev/null
    head -c 3145728 /dev/urandom > /tmp/long
    dd if=/tmp/long of=/dev/vda bs=65536 seek=250 conv=fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
    n=0
    for off in 0 1024 2048 3072; do
        a=$(md5sum < /tmp/p$n)
        b=$(taskset -c $n dd if=/dev/vda bs=4096 skip=$off count=256 2>/dev/null | md5sum)
        [ "$a" = "$b" ] && echo "QSD-VM: pattern $n ok" || echo "QSD-VM: pattern $n BAD"
        n=$((n + 1))
    done
    s=$(dd if=/dev/vda bs=1 skip=22021096 count=18 2>/dev/null)
    [ "$s" = "qsd vhost-user-blk" ] && echo "QSD-VM: small ok" || echo "QSD-VM: small BAD"
    a=$(md5sum < /tmp/long)
    b=$(dd if=/dev/vda bs=65536 skip=250 count=48 2>/dev/null | md5sum)
    [ "$a" = "$b" ] && echo "QSD-VM: long ok" || echo "QSD-VM: long BAD"
    # Discard a range (the node is discard=unmap) and read zeroes there.
    blkdiscard -o 25165824 -l 1048576 /dev/vda && echo "QSD-VM: discard ok"
    z=$(head -c 1048576 /dev/zero | md5sum)
    b=$(dd if=/dev/vda bs=1048576 skip=24 count=1 iflag=direct 2>/dev/null | md5sum)
    [ "$z" = "$b" ] && echo "QSD-VM: zeroes ok" || echo "QSD-VM: zeroes BAD"
fi
echo 3 > /proc/sys/vm/drop_caches
echo "QSD-VM: sum $(md5sum < /dev/vda | cut -d' ' -f1)"
echo "QSD-VM: done"
if [ "$phase" = write ]; then
    sleep 600   # the host kills this QEMU
fi
poweroff -f
"""


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs: the kernel's "newc" cpio format, uncompressed."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _modules(kernel_release: str) -> list[tuple[str, Path]]:
    """virtio_pci and virtio_blk with what they depend on, dependencies first."""
    base = Path("/lib/modules") / kernel_release
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
    order: list[str] = []

    def visit(module: str) -> None:
        for dep in deps.get(module, []):
            visit(dep)
        if module not in order:
            order.append(module)

    for wanted in ("kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/block/virtio_blk.ko"):
        if wanted in deps:
            visit(wanted)
    return [(Path(m).name.removesuffix(".ko"), base / m) for m in order]


def extract_vmlinux(kernel: str, path: Path) -> None:
    """The uncompressed kernel (PVH-bootable ELF): under TCG, decompressing the bzImage
    takes as long as the whole boot after it."""
    data = Path(kernel).read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        # Debian 12's kernels are xz-compressed; sid's (in the test-py314 chroot) are not.
        pytest.skip(f"{kernel} is not an xz-compressed kernel")
    path.write_bytes(lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data[start:]))


def build_initramfs(path: Path, kernel: str) -> None:
    release = Path(kernel).name.removeprefix("vmlinuz-")
    assert BUSYBOX is not None
    entries = [(d, stat.S_IFDIR | 0o755, b"") for d in
               ("bin", "dev", "proc", "sys", "tmp", "modules")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    modules = _modules(release)
    for name, file in modules:
        entries.append((f"modules/{name}.ko", stat.S_IFREG | 0o644, file.read_bytes()))
    entries.append(("modules/order", stat.S_IFREG | 0o644,
                    "".join(f"{name}\n" for name, _ in modules).encode()))
    path.write_bytes(_cpio(entries))


def _kvm_usable() -> bool:
    """KVM with hardware virtualisation (a /dev/kvm without vmx/svm, such as a
    para-virtualised nested KVM, cannot boot an ordinary kernel)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    return "vmx" in flags or "svm" in flags


class Guest:
    """One QEMU process; its serial console goes to a file the test reads."""

    def __init__(self, boot: tuple[Path, Path], sock: Path, phase: str, *,
                 packed: bool) -> None:
        kernel, initrd = boot
        assert QEMU is not None
        self.console = sock.parent / f"console-{phase}-{time.monotonic_ns()}.log"
        accel = ["-accel", "kvm", "-cpu", "host"] if _kvm_usable() else ["-accel", "tcg"]
        device = "vhost-user-blk-pci,chardev=vu,num-queues=4" + (",packed=on" if packed else "")
        self.proc = subprocess.Popen(
            [QEMU, *accel, "-m", "256", "-smp", "4", "-nodefaults", "-no-user-config",
             "-display", "none", "-no-reboot",
             "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
             "-machine", "q35,memory-backend=mem",
             "-chardev", f"socket,id=vu,path={sock}", "-device", device,
             "-chardev", f"file,id=con,path={self.console}", "-serial", "chardev:con",
             "-kernel", str(kernel), "-initrd", str(initrd),
             "-append", f"console=ttyS0 quiet panic=-1 mitigations=off lpj=4000000 "
                        f"no_timer_check qsd.phase={phase}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def output(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.output():
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise AssertionError(f"QEMU exited ({self.proc.returncode}): {out}\n"
                                     f"{self.output()}")
            assert time.monotonic() < deadline, f"no {marker!r}:\n{self.output()}"
            time.sleep(0.05)
        return self.output()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def boot() -> Iterator[tuple[Path, Path]]:
    """The kernel and the initramfs, built once for every guest of the module."""
    path = Path(tempfile.mkdtemp(prefix="qsd-vm-boot-", dir="/tmp"))
    extract_vmlinux(KERNELS[-1], path / "vmlinux")
    build_initramfs(path / "initrd.cpio", KERNELS[-1])
    yield path / "vmlinux", path / "initrd.cpio"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-vm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.kill()


def _start(workdir: Path, start_qsd: QsdFactory, where: str) -> tuple[Path, Path]:
    img = workdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(DISK_SIZE)
    sock = workdir / "vu.sock"
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--blockdev", f"file,node-name=disk,filename={img},discard=unmap",
                       "--export", f"vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                                   f"addr.path={sock},writable=on,num-queues=4,{where}")
    wait_for_listener(sock, daemon.proc)
    return img, sock


def _write_phase(guest: Guest, img: Path) -> str:
    """The first guest's report; returns its checksum of the disk (the host's, too)."""
    out = guest.wait_for("QSD-VM: done", TIMEOUT)
    assert "QSD-VM: queues 4" in out, out
    for check in ("pattern 0", "pattern 1", "pattern 2", "pattern 3", "small", "long",
                  "zeroes"):
        assert f"QSD-VM: {check} ok" in out, out
    assert "QSD-VM: discard ok" in out, out
    guest_sum = re.search(r"QSD-VM: sum ([0-9a-f]{32})", out)
    assert guest_sum is not None, out
    assert guest_sum.group(1) == hashlib.md5(img.read_bytes()).hexdigest()
    return guest_sum.group(1)


TIMEOUT = 90 if _kvm_usable() else 300


def test_guest_on_one_iothread_and_after_qemu_restart(
        workdir: Path, start_qsd: QsdFactory, guests: list[Guest],
        boot: tuple[Path, Path]) -> None:
    """Split rings, all queues in one iothread; the guest's QEMU is killed and a new one
    finds the disk as the first left it."""
    img, sock = _start(workdir, start_qsd, "iothread=io0")
    first = Guest(boot, sock, "write", packed=False)
    guests.append(first)
    disk_sum = _write_phase(first, img)
    first.kill()
    second = Guest(boot, sock, "check", packed=False)
    guests.append(second)
    out = second.wait_for("QSD-VM: done", TIMEOUT)
    assert f"QSD-VM: sum {disk_sum}" in out, out
    assert second.proc.wait(TIMEOUT) == 0


def test_guest_on_two_iothreads(workdir: Path, start_qsd: QsdFactory, guests: list[Guest],
                                boot: tuple[Path, Path]) -> None:
    """Packed rings, the four queues spread over a list of two iothreads."""
    img, sock = _start(workdir, start_qsd, "iothread.0=io0,iothread.1=io1")
    guest = Guest(boot, sock, "write", packed=True)
    guests.append(guest)
    _write_phase(guest, img)
