"""Killing qsd while it writes a qcow2 image never corrupts it, and loses no flushed write.

Each round starts qsd on the same image, writes through NBD (up to 8 requests in flight:
data of every size up to 64 KiB, zero-writes, discards, and flushes every few requests),
and kills the daemon with SIGKILL at a random moment.  Then ``qemu-img check`` must find
no corruption (leaked clusters are what QEMU allows), and every sector must hold what
the last write before the last completed flush left there, or what a later write put
there.  Images with lazy refcounts are marked dirty while written: for them the check runs
after qsd has opened (and repaired) the image once more.  Two kinds start with every
cluster compressed (zlib, and zstd with extended L2 entries), so that the rounds replace
and free compressed clusters.

A few rounds run in every test run; ``QSD_STRESS=1`` (make stress) runs 50 per image.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.harness import Qsd, wait_for_listener

BLOCK = 4096
SECTOR = 512
SIZE = 32 << 20
ROUNDS = 50 if os.environ.get("QSD_STRESS") else 3
KINDS = {
    "v3": ["-o", "cluster_size=65536"],
    "v3-4k-extl2-backing": ["-o", "cluster_size=16384,extended_l2=on", "-b", "base.raw",
                            "-F", "raw"],
    "lazy-refcounts": ["-o", "lazy_refcounts=on,refcount_bits=8"],
    "v2-512": ["-o", "compat=0.10,cluster_size=512"],
    "zlib-compressed": ["-o", "cluster_size=65536"],
    "zstd-compressed-extl2": ["-o", "cluster_size=32768,extended_l2=on,compression_type=zstd"],
}
# Kinds whose image starts with every cluster compressed (qemu-img convert -c): writes
# replace compressed clusters, and discards and zero-writes free them.
COMPRESSED = {"zlib-compressed", "zstd-compressed-extl2"}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-qcow2c-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Model:
    """What each block may hold: its durable value and the values written since."""

    def __init__(self, initial: bytes) -> None:
        self.blocks = len(initial) // BLOCK
        # Per block: (issue id, value), the durable one first.
        self.values: list[list[tuple[int, bytes]]] = [
            [(0, initial[i * BLOCK:(i + 1) * BLOCK])] for i in range(self.blocks)]
        self.ids = 0
        self.completed: dict[int, int] = {}      # block -> issue id of its last write
        # For the failure message: every value each block was given, the block and id
        # each written tag belongs to, and what happened to each block in order.
        self.history: list[list[tuple[int, bytes]]] = [list(v) for v in self.values]
        self.owners: dict[bytes, tuple[int, int]] = {}
        self.events: dict[int, list[str]] = {}
        self.flushes: list[dict[int, int]] = []     # the snapshots of completed flushes

    def issued(self, block: int, value: bytes) -> int:
        self.ids += 1
        self.values[block].append((self.ids, value))
        self.history[block].append((self.ids, value))
        self.owners[value[:8]] = (block, self.ids)
        return self.ids

    def note(self, block: int, event: str) -> None:
        self.events.setdefault(block, []).append(f"{event} after {len(self.flushes)} flushes")

    def describe(self, block: int, data: bytes) -> str:
        """What each sector of a block that failed holds: one of its own values (and
        whether still allowed), zeroes, another block's value, or something else."""
        sectors = []
        for s in range(0, BLOCK, SECTOR):
            sector = data[s:s + SECTOR]
            own = [i for i, v in self.history[block] if v[s:s + SECTOR] == sector]
            if own:
                allowed = any(i == own[-1] for i, _ in self.values[block])
                sectors.append(f"#{own[-1]}{'' if allowed else ' (no longer allowed)'}")
            elif sector == bytes(SECTOR):
                sectors.append("zeroes")
            elif sector[:8] in self.owners:
                owner, ident = self.owners[sector[:8]]
                sectors.append(f"block {owner}'s #{ident}")
            else:
                sectors.append("unknown " + sector[:16].hex())
        flushed = {f"#{f[block]}": n + 1 for n, f in enumerate(self.flushes) if block in f}
        return (f"block {block} holds {sectors}; allowed "
                f"{[i for i, _ in self.values[block]]}; events {self.events.get(block)}; "
                f"the last flush that made each durable {flushed}")

    def done(self, block: int, ident: int) -> None:
        self.completed[block] = ident

    def flush_started(self) -> dict[int, int]:
        return dict(self.completed)

    def flush_done(self, snapshot: dict[int, int]) -> None:
        """Writes completed before the flush was sent are durable now."""
        self.flushes.append(snapshot)
        for block, ident in snapshot.items():
            self.values[block] = [(i, v) for i, v in self.values[block] if i >= ident]

    def allowed(self, block: int, data: bytes) -> bool:
        """Each sector holds that sector of a value the block may hold: a write cut
        short by the kill may have reached some sectors (clusters) and not others."""
        return all(any(v[s:s + SECTOR] == data[s:s + SECTOR] for _, v in self.values[block])
                   for s in range(0, BLOCK, SECTOR))


def _value(tag: int, length: int) -> bytes:
    unit = tag.to_bytes(8, "little")
    return unit * (length // 8)


def writer(sock: Path, model: Model, rng: random.Random, stop: threading.Event) -> None:
    """Writes until the connection dies (the daemon is killed)."""
    h = nbd.NBD()
    try:
        h.connect_uri(f"nbd+unix:///disk?socket={sock}")
        inflight: dict[int, tuple[list[int], list[int]]] = {}
        busy: set[int] = set()
        flushing: dict[int, dict[int, int]] = {}
        tag = rng.randrange(1 << 40)
        count = 0
        while not stop.is_set():
            for cookie in list(inflight):
                if h.aio_command_completed(cookie):
                    blocks, idents = inflight.pop(cookie)
                    for block, ident in zip(blocks, idents, strict=True):
                        model.note(block, f"done #{ident}")
                        model.done(block, ident)
                        busy.discard(block)
            for cookie in list(flushing):
                if h.aio_command_completed(cookie):
                    model.flush_done(flushing.pop(cookie))
            if len(inflight) >= 8:
                h.poll(1)
                continue
            count += 1
            if count % 7 == 0:
                flushing[h.aio_flush()] = model.flush_started()
                continue
            kind = rng.choice(["write"] * 6 + ["zero", "trim"])
            nblocks = rng.choice([1, 1, 2, 4, 16])
            first = rng.randrange(0, model.blocks - nblocks)
            if kind == "trim":
                # Discards of whole clusters (all kinds here have clusters of 64 KiB or
                # less): partial ones are hints an image may ignore.
                nblocks = 16
                first -= first % 16
            blocks = list(range(first, first + nblocks))
            if busy.intersection(blocks):
                continue
            if kind == "write":
                values = []
                for _ in blocks:
                    tag += 1
                    values.append(_value(tag, BLOCK))
                cookie = h.aio_pwrite(b"".join(values), first * BLOCK)
            else:
                values = [bytes(BLOCK)] * nblocks
                if kind == "zero":
                    cookie = h.aio_zero(nblocks * BLOCK, first * BLOCK)
                else:
                    cookie = h.aio_trim(nblocks * BLOCK, first * BLOCK)
            idents = [model.issued(block, value)
                      for block, value in zip(blocks, values, strict=True)]
            for block, ident in zip(blocks, idents, strict=True):
                model.note(block, f"{kind} #{ident} ({nblocks} from {first})")
            busy.update(blocks)
            inflight[cookie] = (blocks, idents)
    except nbd.Error:
        pass
    finally:
        del h


def check(image: Path, cwd: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                         capture_output=True, text=True, timeout=120, cwd=cwd)
    result: dict[str, object] = json.loads(out.stdout)
    assert out.returncode in (0, 3), out.stdout + out.stderr
    assert result.get("corruptions", 0) == 0 and result.get("check-errors", 0) == 0, result
    return result


def read_image(image: Path, cwd: Path) -> bytes:
    out = cwd / "read.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True,
                   timeout=120, cwd=cwd)
    return out.read_bytes()


def start(image: Path, workdir: Path) -> tuple[Qsd, Path]:
    sock = workdir / "nbd.sock"
    daemon = Qsd(workdir, [
        "--blockdev", f"driver=qcow2,node-name=disk,discard=unmap,file.driver=file,"
                      f"file.filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=disk,writable=on"], monitor=False)
    wait_for_listener(sock, daemon.proc)
    return daemon, sock


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kill_while_writing(kind: str, workdir: Path) -> None:
    if "base.raw" in KINDS[kind]:
        base = workdir / "base.raw"
        base.write_bytes(random.Random(1).randbytes(SIZE))
    image = workdir / "disk.qcow2"
    if kind in COMPRESSED:
        # Compressible content: each block is 512 random bytes, 8 times.
        fill = random.Random(2)
        source = workdir / "source.raw"
        source.write_bytes(b"".join(fill.randbytes(512) * 8 for _ in range(SIZE // BLOCK)))
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
                        *KINDS[kind], str(source), str(image)], check=True, cwd=workdir)
        source.unlink()
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *KINDS[kind], str(image),
                        str(SIZE)], check=True, cwd=workdir)
    lazy = "lazy" in kind
    rng = random.Random(kind)
    for round_ in range(ROUNDS):
        current = read_image(image, workdir)
        model = Model(current)
        daemon, sock = start(image, workdir)
        stop = threading.Event()
        thread = threading.Thread(target=writer, args=(sock, model, rng, stop))
        thread.start()
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(daemon.pid, signal.SIGKILL)
        thread.join(60)
        stop.set()
        daemon.stop()
        if lazy:
            # The dirty image is repaired when it is opened again.
            daemon, sock = start(image, workdir)
            assert daemon.stop() == 0, daemon.stderr.decode()
        check(image, workdir)
        after = read_image(image, workdir)
        bad = [b for b in range(model.blocks)
               if not model.allowed(b, after[b * BLOCK:(b + 1) * BLOCK])]
        assert not bad, f"round {round_}: blocks {bad[:10]} hold no value they may hold\n" + \
            "\n".join(model.describe(b, after[b * BLOCK:(b + 1) * BLOCK]) for b in bad[:6])
