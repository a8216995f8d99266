"""qcow2 images made by qemu-img and qemu-io, for the tests of qsd's qcow2 driver.

Each ``Recipe`` is one combination of the format's options (version, cluster size,
refcount width, extended L2 entries, lazy refcounts, compression type, backing files,
external data files, preallocation, internal snapshots); ``build`` creates the image
with QEMU's own tools and writes a pattern into it that exercises the cluster types:
data, partial clusters over unallocated ones (copy-on-write from the backing file),
writes across cluster boundaries, zero clusters, discarded clusters, compressed
clusters and the last sector of the disk.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

from qsd.block.drivers.qcow2 import format as fmt

KiB = 1024
MiB = 1024 * KiB


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    cluster_size: int = 64 * KiB
    compat: str = "1.1"
    refcount_bits: int = 16
    extended_l2: bool = False
    lazy_refcounts: bool = False
    compression: str = ""             # "", "zlib", "zstd": write compressed clusters
    backing: str = ""                 # "", "qcow2", "raw", "chain" (raw <- qcow2 <- top)
    backing_fmt_in_header: bool = True
    data_file: bool = False
    data_file_raw: bool = False
    preallocation: str = ""
    snapshot: bool = False            # an internal snapshot, then more writes
    converted: bool = False           # qemu-img convert -c of a pattern file

    @property
    def size(self) -> int:
        return max(16 * self.cluster_size, 4 * MiB)

    def options(self) -> str:
        opts = [f"cluster_size={self.cluster_size}", f"compat={self.compat}",
                f"refcount_bits={self.refcount_bits}"]
        if self.extended_l2:
            opts.append("extended_l2=on")
        if self.lazy_refcounts:
            opts.append("lazy_refcounts=on")
        if self.compression:
            opts.append(f"compression_type={self.compression}")
        if self.preallocation:
            opts.append(f"preallocation={self.preallocation}")
        if self.data_file_raw:
            opts.append("data_file_raw=on")
        return ",".join(opts)


RECIPES = [
    Recipe("v3-64k"),
    Recipe("v2-64k", compat="0.10"),
    Recipe("v3-512", cluster_size=512),
    Recipe("v2-512", cluster_size=512, compat="0.10"),
    Recipe("v3-4k", cluster_size=4 * KiB),
    Recipe("v3-2m", cluster_size=2 * MiB),
    Recipe("v2-2m", cluster_size=2 * MiB, compat="0.10"),
    *(Recipe(f"refcount-{bits}", refcount_bits=bits) for bits in (1, 2, 4, 8, 32, 64)),
    Recipe("refcount-1-512", cluster_size=512, refcount_bits=1),
    Recipe("refcount-64-4k", cluster_size=4 * KiB, refcount_bits=64),
    Recipe("extl2-64k", extended_l2=True),
    Recipe("extl2-16k", cluster_size=16 * KiB, extended_l2=True),
    Recipe("extl2-2m", cluster_size=2 * MiB, extended_l2=True),
    Recipe("lazy-refcounts", lazy_refcounts=True),
    Recipe("zlib", compression="zlib"),
    Recipe("zstd", compression="zstd"),
    Recipe("zstd-extl2", compression="zstd", extended_l2=True),
    Recipe("zlib-v2-4k", compression="zlib", compat="0.10", cluster_size=4 * KiB),
    Recipe("backing-qcow2", backing="qcow2"),
    Recipe("backing-raw", backing="raw"),
    Recipe("backing-v2", backing="qcow2", compat="0.10"),
    Recipe("backing-probed", backing="raw", backing_fmt_in_header=False),
    Recipe("backing-extl2", backing="qcow2", extended_l2=True),
    Recipe("backing-4k-zstd", backing="qcow2", cluster_size=4 * KiB, compression="zstd"),
    Recipe("backing-chain", backing="chain"),
    Recipe("data-file", data_file=True),
    Recipe("data-file-raw", data_file=True, data_file_raw=True),
    Recipe("prealloc-metadata", preallocation="metadata"),
    Recipe("prealloc-falloc", preallocation="falloc"),
    Recipe("prealloc-full", preallocation="full"),
    Recipe("prealloc-extl2-backing", preallocation="metadata", extended_l2=True,
           backing="qcow2"),
    Recipe("snapshot", snapshot=True),
    Recipe("converted-zlib", converted=True, compression="zlib"),
    Recipe("converted-zstd-v3-8k", converted=True, compression="zstd", cluster_size=8 * KiB),
]


def run(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120,
                          cwd=cwd).stdout


def drop_backing_format(image: Path) -> None:
    """Rewrites the header without the backing format extension (old images had none;
    qemu-img no longer makes such images), so that the format must be probed."""
    with open(image, "r+b") as f:
        first = f.read(65536)
        hdr = fmt.Header.unpack(first)
        start = 72 if hdr.version == 2 else hdr.header_length
        extensions = fmt.parse_extensions(first, start, hdr.backing_file_offset)
        name = first[hdr.backing_file_offset:hdr.backing_file_offset + hdr.backing_file_size]
        others = [(m, d) for m, d in extensions
                  if m not in (fmt.EXT_BACKING_FORMAT, fmt.EXT_FEATURE_TABLE)]
        f.seek(0)
        f.write(fmt.build_header_cluster(hdr, backing_file=name.decode(),
                                         unknown_extensions=others))


def pattern(cluster_size: int, size: int, compressed: bool) -> list[str]:
    """qemu-io commands that leave every kind of cluster in an image."""
    cs = cluster_size
    cmds = [
        f"write -P 0x5a 0 {cs}",
        f"write -P 0x31 {cs + 1000} 3000",
        f"write -P 0x77 {3 * cs - 512} 1024",
        f"write -z {4 * cs} {2 * cs}",
        f"write -P 0x11 {8 * cs} {cs}",
        f"write -z {8 * cs} {cs}",
        f"write -P 0x22 {10 * cs} {cs}",
        f"discard {10 * cs} {cs}",
        f"write -P 0x99 {size - 4096} 4096",
    ]
    if compressed:
        cmds += [f"write -c -P 0x42 {12 * cs} {cs}", f"write -c -P 0x43 {13 * cs} {cs}",
                 f"write -P 0x44 {13 * cs + 512} 512"]
    return cmds


def qemu_io(image: Path, fmt: str, cmds: list[str], cwd: Path | None = None) -> None:
    """Runs in ``cwd`` (default: the image's directory): QEMU opens relative data file
    names from the working directory."""
    args = ["qemu-io", "-f", fmt]
    for cmd in cmds:
        args += ["-c", cmd]
    run(*args, str(image), cwd=cwd or image.parent)


def _base(directory: Path, name: str, fmt: str, size: int) -> Path:
    path = directory / f"{name}.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, str(path), str(size))
    qemu_io(path, fmt, [f"write -P 0xb0 0 {size // 2}", f"write -P 0xb1 {size // 2} 65536",
                        f"write -P 0xb2 {size - 65536} 65536"])
    return path


def build(recipe: Recipe, directory: Path, cwd: Path | None = None) -> Path:
    """Makes the image of ``recipe`` in ``directory``; returns its path.  A data file
    is named relative to ``cwd`` (default: ``directory``), where QEMU, and whoever
    opens the image later, looks for it."""
    cwd = cwd or directory
    image = directory / f"{recipe.name}.qcow2"
    size = recipe.size
    if recipe.converted:
        source = directory / "source.raw"
        run("qemu-img", "create", "-q", "-f", "raw", str(source), str(size))
        qemu_io(source, "raw", pattern(recipe.cluster_size, size, False))
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", recipe.options(),
            str(source), str(image))
        return image
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", recipe.options()]
    if recipe.backing:
        if recipe.backing == "chain":
            bottom = _base(directory, "bottom", "raw", size)
            middle = directory / "middle.qcow2"
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", bottom.name, "-F", "raw",
                str(middle))
            qemu_io(middle, "qcow2", [f"write -P 0xc0 {size // 4} {size // 4}"])
            base, base_fmt = middle, "qcow2"
        else:
            base = _base(directory, "base", recipe.backing, size)
            base_fmt = recipe.backing
        create += ["-b", base.name, "-F", base_fmt]
    if recipe.data_file:
        create[-1] += f",data_file={os.path.relpath(directory / recipe.name, cwd)}.data"
    run(*create, str(image), str(size), cwd=cwd)
    if recipe.backing and not recipe.backing_fmt_in_header:
        drop_backing_format(image)
    cmds = pattern(recipe.cluster_size, size, bool(recipe.compression))
    if recipe.snapshot:
        qemu_io(image, "qcow2", cmds[:3], cwd)
        run("qemu-img", "snapshot", "-c", "snap1", str(image), cwd=cwd)
        cmds = cmds[3:] + [f"write -P 0x66 {recipe.cluster_size // 2} 512"]
    qemu_io(image, "qcow2", cmds, cwd)
    return image


def reference(image: Path, out: Path, cwd: Path | None = None) -> bytes:
    """What the image reads as, according to qemu-img."""
    run("qemu-img", "convert", "-U", "-O", "raw", str(image), str(out),
        cwd=cwd or image.parent)
    return out.read_bytes()
