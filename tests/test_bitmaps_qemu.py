"""Dirty bitmaps as QEMU 11.1.3 has them, from the outside: the block-dirty-bitmap-*
commands and ``transaction`` (replies and error texts byte for byte, query output with
counts after writes through NBD), what an NBD client reads from ``qemu:dirty-bitmap:NAME``
(nbdinfo --map), and persistent bitmaps in qcow2 images: what qemu-img says of the image
qsd closed, what qsd loads from images QEMU wrote (``qemu-img bitmap``, writes by
QEMU's qemu-io, a daemon killed with bitmaps in use).

Each scenario runs the same steps on qsd and on 11.1.3 (``tests/test_bitmaps_qemu.json``,
recorded in the sid chroot); the host's qemu-io and nbdinfo are the clients of both, and
11.1.3's qemu-img looks at the images either daemon left.

    python -m tests.test_bitmaps_qemu --record   # re-record with 11.1.3 (sid chroot)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import QSD, RawMonitor, wait_for_listener
from tests.test_qcow2_corruption import SID_RUN

GOLDEN = Path(__file__).with_suffix(".json")
LONG = "x" * 1024

Step = tuple[Any, ...]


def qmp(command: str, **args: Any) -> Step:
    return ("qmp", {"execute": command, "arguments": args})


def add(node: str, name: str, **args: Any) -> Step:
    return qmp("block-dirty-bitmap-add", node=node, name=name, **args)


def act(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def nodes(*names: str) -> Step:
    """query-named-block-nodes, only the dirty bitmaps of ``names``."""
    return ("nodes", names)


def sid(*argv: str) -> list[str]:
    return [*SID_RUN, *argv]


def run(argv: list[str], d: Path) -> str:
    proc = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=120)
    return f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}"


class Player:
    """One daemon (qsd or 11.1.3's) with a monitor and an NBD server in ``d``; plays
    steps and keeps what each says, with the directory masked."""

    def __init__(self, daemon: list[str], d: Path, *args: str) -> None:
        self.d = d
        self.qmp_path = d / "qmp.sock"
        self.nbd_path = d / "nbd.sock"
        self.proc = subprocess.Popen(
            [*daemon, *args, "--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}",
             "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
             "--monitor", "chardev=m"], cwd=d, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_for_listener(self.qmp_path, self.proc, timeout=60)
        self.mon = RawMonitor(self.qmp_path)
        self.mon.negotiate()
        self.out: list[str] = []
        self.events: list[str] = []

    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        line = self.mon.command(json.dumps(cmd).replace("@DIR@", str(self.d)).encode())
        while line.startswith(b'{"timestamp"'):
            self.events.append(json.loads(line)["event"])
            line = self.mon.recv_line()
        masked = re.sub(r'"#block\d+"', '"#block"', line.decode().replace(str(self.d), "@DIR@"))
        # Allocated sizes are the file system's business.
        self.out.append(re.sub(r'"actual-size": \d+', '"actual-size": 0', masked))
        reply: dict[str, Any] = json.loads(line)
        return reply

    def nbd_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_path}"

    def play(self, steps: list[Step]) -> list[str]:
        for step in steps:
            kind = step[0]
            if kind == "qmp":
                self.command(step[1])
            elif kind == "nodes":
                reply = self.command({"execute": "query-named-block-nodes",
                                      "arguments": {"flat": True}})
                self.out.pop()
                shown = {n["node-name"]: n.get("dirty-bitmaps")
                         for n in reply["return"] if n["node-name"] in step[1]}
                self.out.append(json.dumps(shown, sort_keys=True))
            elif kind == "wait":
                while step[1] not in self.events:
                    self.events.append(json.loads(self.mon.recv_line())["event"])
                self.events.remove(step[1])
            elif kind == "io":
                said = run(["qemu-io", "-f", "raw", self.nbd_uri(step[1]),
                            *[a for c in step[2] for a in ("-c", c)]], self.d)
                self.out.append("".join(line + "\n" for line in said.splitlines()
                                        if "ops/sec" not in line))
            elif kind == "map":
                self.out.append(run(["nbdinfo", f"--map={step[2]}", self.nbd_uri(step[1])],
                                    self.d))
            elif kind == "contexts":
                listing = run(["nbdinfo", "--list", "--json", f"{self.nbd_uri('')}"], self.d)
                body = json.loads(listing.split("\n", 1)[1])
                self.out.append(json.dumps(
                    {e["export-name"]: e.get("contexts") for e in body["exports"]},
                    sort_keys=True))
        return self.out

    def quit(self) -> None:
        self.mon.send(b'{"execute": "quit"}\n')
        self.proc.wait(30)
        self.mon.close()

    def kill(self) -> None:
        """SIGKILL to the daemon itself: the process started here, or for 11.1.3 the
        last of its descendants (the chroot wrapper's child)."""
        pid = self.proc.pid
        while True:
            children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                        for c in (task / "children").read_text().split()]
            if not children:
                break
            pid = int(children[0])
        os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        self.mon.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def images(d: Path) -> None:
    def img(*args: str) -> None:
        subprocess.run(sid("qemu-img", *args), check=True, cwd=d, stdout=subprocess.DEVNULL)

    img("create", "-q", "-f", "qcow2", "a.qcow2", "64M")
    img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "s.qcow2", "1M")
    img("create", "-q", "-f", "raw", "r.raw", "1M")
    # Bitmaps that QEMU made: one recording (QEMU's qemu-io writes update it), one
    # disabled, one with a coarse granularity.
    img("create", "-q", "-f", "qcow2", "q.qcow2", "16M")
    img("bitmap", "--add", "q.qcow2", "rec")
    img("bitmap", "--add", "-g", "512k", "q.qcow2", "coarse")
    img("bitmap", "--add", "--disable", "q.qcow2", "off")
    subprocess.run(sid("qemu-io", "-c", "write 1M 64k", "-c", "write 5M 4k",
                       "-c", "write 15M 1M", "q.qcow2"), check=True, cwd=d,
                   stdout=subprocess.DEVNULL)


def commands_steps() -> list[Step]:
    bm = "block-dirty-bitmap-"
    return [
        add("a", ""), add("nope", "x"), add("a", "x", granularity=100),
        add("a", "x", granularity=3000), add("a", "x", granularity=4294967295),
        add("a", "b0"), add("s", "b0"), add("n", "b0"), add("r", "b0"), add("a", "b0"),
        add("a", LONG), add("a", LONG, persistent=True), add("r", "p", persistent=True),
        add("v2", "p", persistent=True), add("s", "p", persistent=True, granularity=512),
        add("a", "p1", persistent=True, granularity=65536),
        add("a", "p2", persistent=True, disabled=True, granularity=131072),
        add("a", "p1", persistent=True),
        nodes("a", "s", "n", "r"),
        qmp("block-export-add", type="nbd", id="e", **{"node-name": "a"}, writable=True,
            bitmaps=["b0", {"node": "a", "name": "p2"}]),
        qmp(bm + "remove", node="a", name="b0"), qmp(bm + "clear", node="a", name="b0"),
        qmp(bm + "enable", node="a", name="b0"), qmp(bm + "disable", node="a", name="b0"),
        qmp(bm + "merge", node="a", target="b0", bitmaps=["p1"]),
        ("io", "a", ["write -P 1 0 4k", "write -P 2 1M 64k", "write -P 3 10M 200k",
                     "write -z 20M 1M", "discard 30M 64k", "write -P 4 65535k 1k"]),
        nodes("a"),
        ("contexts",),
        ("map", "a", "qemu:dirty-bitmap:b0"), ("map", "a", "qemu:dirty-bitmap:p2"),
        ("map", "a", "base:allocation"),
        qmp("block-export-del", id="e"), ("wait", "BLOCK_EXPORT_DELETED"),
        qmp("block-export-add", type="nbd", id="e2", **{"node-name": "a"},
            bitmaps=["b0"]),
        qmp("block-export-add", type="nbd", id="e3", **{"node-name": "a"},
            bitmaps=["p2"], name="ro"),
        qmp("block-export-add", type="nbd", id="e4", **{"node-name": "a"},
            bitmaps=["nope"], name="x"),
        qmp("block-export-add", type="nbd", id="e5", **{"node-name": "a"},
            bitmaps=[{"node": "nope", "name": "b0"}], name="y"),
        qmp("block-export-add", type="nbd", id="e6", **{"node-name": "a"},
            bitmaps=[{"node": "s", "name": "nope"}], name="z"),
        ("map", "ro", "qemu:dirty-bitmap:p2"),
        qmp("block-export-del", id="e3"), ("wait", "BLOCK_EXPORT_DELETED"),
        qmp(bm + "remove", node="nope", name="b0"), qmp(bm + "remove", node="a", name="nope"),
        qmp(bm + "merge", node="a", target="p1", bitmaps=["b0", "nope"]),
        qmp(bm + "merge", node="a", target="p1", bitmaps=[{"node": "n", "name": "b0"}]),
        qmp(bm + "merge", node="a", target="p1", bitmaps=[{"node": "zz", "name": "b0"}]),
        qmp(bm + "merge", node="a", target="p1", bitmaps=["b0", "p2"]),
        qmp(bm + "merge", node="a", target="nope", bitmaps=["b0"]),
        qmp(bm + "disable", node="a", name="p1"), qmp(bm + "enable", node="a", name="p2"),
        nodes("a"),
        qmp("transaction", actions=[act(bm + "add", node="a", name="t1"),
                                    act(bm + "clear", node="a", name="p1"),
                                    act(bm + "disable", node="a", name="p2"),
                                    act("abort")]),
        nodes("a"),
        qmp("transaction", actions=[act(bm + "add", node="a", name="t1")],
            properties={"completion-mode": "grouped"}),
        qmp("transaction", actions=[act(bm + "remove", node="a", name="p1"),
                                    act(bm + "add", node="a", name="p1")]),
        qmp("transaction", actions=[act(bm + "remove", node="a", name="p1"),
                                    act(bm + "remove", node="a", name="p1")]),
        nodes("a"),
        qmp("transaction", actions=[act(bm + "add", node="a", name="t1", granularity=4096),
                                    act(bm + "merge", node="a", target="t1",
                                        bitmaps=["b0"]),
                                    act(bm + "clear", node="a", name="b0"),
                                    act(bm + "remove", node="a", name="p1"),
                                    act(bm + "disable", node="a", name="t1")]),
        nodes("a"),
        qmp("transaction", actions=[]),
        qmp("transaction", actions=[act("blockdev-snapshot", node="a", overlay="nope")]),
        qmp("blockdev-add", driver="qcow2", **{"node-name": "ov"},
            file={"driver": "file", "filename": "@DIR@/ov.qcow2"}),
        qmp("transaction", actions=[act(bm + "add", node="a", name="t9"),
                                    act("blockdev-snapshot", node="a", overlay="ov"),
                                    act(bm + "add", node="ov", name="t9")]),
        nodes("a", "ov"),
        qmp("blockdev-add", driver="qcow2", **{"node-name": "ov3"},
            file={"driver": "file", "filename": "@DIR@/ov3.qcow2"}),
        qmp("transaction", actions=[act("blockdev-snapshot", node="ov", overlay="ov3"),
                                    act(bm + "add", node="ov3", name="t3"),
                                    act(bm + "clear", node="ov", name="nope")]),
        qmp("query-named-block-nodes", flat=True),
    ]


def commands_transcript(daemon: list[str], d: Path) -> dict[str, Any]:
    images(d)
    for overlay in ("ov.qcow2", "ov3.qcow2"):
        subprocess.run(sid("qemu-img", "create", "-q", "-f", "qcow2", overlay, "64M"),
                       check=True, cwd=d)
    player = Player(daemon, d,
                    "--blockdev", "file,node-name=fa,filename=a.qcow2",
                    "--blockdev", "qcow2,node-name=a,file=fa",
                    "--blockdev", "qcow2,node-name=v2,file.driver=file,"
                                  "file.filename=v2.qcow2",
                    "--blockdev", "qcow2,node-name=s,file.driver=file,file.filename=s.qcow2",
                    "--blockdev", "file,node-name=r,filename=r.raw",
                    "--blockdev", "null-co,node-name=n,size=1048576")
    try:
        out = player.play(commands_steps())
        player.quit()
    finally:
        player.stop()
    info = run(sid("qemu-img", "info", "--output=json", "a.qcow2"), d)
    check = run(sid("qemu-img", "check", "a.qcow2"), d)
    return {"steps": out, "info": re.sub(r'"actual-size": \d+', '"actual-size": 0', info),
            "check": check}


def persistent_steps() -> list[Step]:
    return [
        nodes("q", "qro"),
        qmp("block-export-add", type="nbd", id="e", **{"node-name": "q"}, writable=True,
            bitmaps=["rec", "coarse", "off"]),
        ("map", "q", "qemu:dirty-bitmap:rec"), ("map", "q", "qemu:dirty-bitmap:coarse"),
        ("map", "q", "qemu:dirty-bitmap:off"),
        ("io", "q", ["write -P 7 8M 4k"]),
        ("map", "q", "qemu:dirty-bitmap:rec"),
        qmp("block-export-add", type="nbd", id="e2", **{"node-name": "qro"},
            bitmaps=["rec"], name="ro"),
        ("map", "ro", "qemu:dirty-bitmap:rec"),
        qmp("block-dirty-bitmap-clear", node="qro", name="rec"),
        qmp("block-dirty-bitmap-add", node="q", name="new", persistent=True),
        qmp("block-dirty-bitmap-add", node="q", name="new2", persistent=True),
        qmp("block-dirty-bitmap-remove", node="q", name="coarse"),
        qmp("block-dirty-bitmap-remove", node="q", name="new2"),
        nodes("q"),
    ]


def persistent_transcript(daemon: list[str], d: Path) -> dict[str, Any]:
    """qsd or 11.1.3 opens an image with QEMU's bitmaps, writes, closes; the image is
    then opened again and killed (bitmaps stay in use), and opened a third time."""
    images(d)
    shutil.copy(d / "q.qcow2", d / "qro.qcow2")
    out: dict[str, Any] = {}
    player = Player(daemon, d, "--blockdev",
                    "qcow2,node-name=q,file.driver=file,file.filename=q.qcow2",
                    "--blockdev", "qcow2,node-name=qro,read-only=on,file.driver=file,"
                                  "file.filename=qro.qcow2")
    try:
        out["first"] = player.play(persistent_steps())
        player.quit()
    finally:
        player.stop()
    out["info-closed"] = run(sid("qemu-img", "info", "--output=json", "q.qcow2"), d)
    out["check-closed"] = run(sid("qemu-img", "check", "q.qcow2"), d)
    player = Player(daemon, d, "--blockdev",
                    "qcow2,node-name=q,file.driver=file,file.filename=q.qcow2")
    try:
        out["second"] = player.play([nodes("q")])
        player.kill()
    finally:
        player.stop()
    out["info-killed"] = run(sid("qemu-img", "info", "--output=json", "-U", "q.qcow2"), d)
    player = Player(daemon, d, "--blockdev",
                    "qcow2,node-name=q,file.driver=file,file.filename=q.qcow2")
    try:
        out["third"] = player.play([
            nodes("q"), qmp("block-dirty-bitmap-clear", node="q", name="rec"),
            qmp("block-dirty-bitmap-enable", node="q", name="rec"),
            qmp("block-export-add", type="nbd", id="e", **{"node-name": "q"},
                bitmaps=["rec"]),
            qmp("block-dirty-bitmap-remove", node="q", name="rec"), nodes("q")])
        player.quit()
    finally:
        player.stop()
    out["info-third"] = run(sid("qemu-img", "info", "--output=json", "q.qcow2"), d)
    out["check-third"] = run(sid("qemu-img", "check", "q.qcow2"), d)
    for key, value in out.items():
        if isinstance(value, str):
            out[key] = re.sub(r'"actual-size": \d+', '"actual-size": 0',
                              value.replace(str(d), "@DIR@"))
    return out


SCENARIOS = {"commands": commands_transcript, "persistent": persistent_transcript}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-bitmaps-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def have_sid() -> None:
    if subprocess.run([*SID_RUN, "true"], capture_output=True, timeout=120).returncode:
        pytest.skip("the sid chroot with QEMU 11.1.3 is not set up")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_as_qemu(workdir: Path, scenario: str) -> None:
    have_sid()
    expected = json.loads(GOLDEN.read_text())[scenario]
    got = SCENARIOS[scenario](QSD, workdir)
    for key in expected:
        if isinstance(expected[key], list):
            for index, (want, have) in enumerate(zip(expected[key], got[key], strict=True)):
                assert have == want, f"{key}[{index}]"
        else:
            assert got[key] == expected[key], key


def record() -> None:
    golden: dict[str, Any] = {}
    for name, transcript in SCENARIOS.items():
        workdir = Path(tempfile.mkdtemp(prefix="qsd-bitmaps-", dir="/tmp"))
        try:
            golden[name] = transcript(sid("qemu-storage-daemon"), workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        time.sleep(0.1)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__" and "--record" in sys.argv:
    record()


def test_qemu_reads_what_qsd_stored(workdir: Path) -> None:
    """A persistent bitmap qsd filled from NBD writes and stored on close is the bitmap
    QEMU 11.1.3 loads from the image (its NBD export maps it the same), and a bitmap
    11.1.3 then fills is what qsd loads."""
    have_sid()
    subprocess.run(sid("qemu-img", "create", "-q", "-f", "qcow2", "x.qcow2", "32M"),
                   check=True, cwd=workdir)
    node = ["--blockdev", "qcow2,node-name=x,file.driver=file,file.filename=x.qcow2"]
    export = [qmp("block-export-add", type="nbd", id="e", **{"node-name": "x"},
                  writable=True, bitmaps=["b"])]
    writes = [f"write -P {i % 250 + 1} {i * 1234567 % (31 << 20)} {4096 + i * 777}"
              for i in range(40)]

    def session(daemon: list[str], steps: list[Step]) -> list[str]:
        player = Player(daemon, workdir, *node)
        try:
            out = player.play(steps)
            player.quit()
        finally:
            player.stop()
        return out

    qsd_map = session(QSD, [qmp("block-dirty-bitmap-add", node="x", name="b",
                                persistent=True, granularity=16384),
                            *export, ("io", "x", writes), ("map", "x", "qemu:dirty-bitmap:b")])
    assert qsd_map[0] == '{"return": {}}' and "dirty" in qsd_map[-1]
    qemu_map = session(sid("qemu-storage-daemon"),
                       [*export, ("map", "x", "qemu:dirty-bitmap:b"),
                        ("io", "x", ["write -P 9 31M 8k"]),
                        ("map", "x", "qemu:dirty-bitmap:b")])
    assert qemu_map[1] == qsd_map[-1]
    again = session(QSD, [*export, ("map", "x", "qemu:dirty-bitmap:b")])
    assert again[-1] == qemu_map[-1] != qemu_map[1]
    assert run(sid("qemu-img", "check", "x.qcow2"), workdir).startswith(
        "rc=0\nNo errors were found on the image.")
