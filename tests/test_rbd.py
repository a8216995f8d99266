"""The rbd driver against a real single-node Ceph cluster (the ``ceph_cluster`` fixture):
fio through a FUSE export, qemu-img through an NBD export, Ceph's own ``rbd`` tool to
read back what reached the cluster, and QEMU 11.1.3's texts for what goes wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

from tests.conftest import CephCluster, QsdFactory
from tests.harness import Monitor, Qsd

MiB = 1 << 20


def new_image(cluster: CephCluster, size: str) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    cluster.rbd("create", "--size", size, f"rbd/{name}")
    return name


def rbd_node(cluster: CephCluster, image: str, name: str = "r0", extra: str = "") -> str:
    return f"rbd,node-name={name},pool=rbd,image={image},conf={cluster.conf}{extra}"


def exported(cluster: CephCluster, image: str, target: Path) -> bytes:
    """The image's bytes as Ceph's rbd tool reads them."""
    target.unlink(missing_ok=True)
    cluster.rbd("export", "--no-progress", f"rbd/{image}", str(target))
    return target.read_bytes()


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def nbd_uri(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def test_fio_verify_through_fuse(ceph_cluster: CephCluster, fuse_dir: Path,
                                 start_qsd: QsdFactory) -> None:
    """Random writes through a FUSE export with two queues in two iothreads (librbd's
    completions reach both loops), verified by fio, then read back by Ceph itself once
    the export is gone."""
    image = new_image(ceph_cluster, "64M")
    mp = fuse_dir / "rbd.fuse"
    mp.touch()
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--blockdev", rbd_node(ceph_cluster, image),
                       "--export", f"fuse,id=e0,node-name=r0,mountpoint={mp},writable=on,"
                                   "iothread.0=io0,iothread.1=io1")
    mon = Monitor(daemon)
    run("fio", "--name=t", f"--filename={mp}", "--direct=1", "--bs=4k", "--ioengine=libaio",
        "--iodepth=16", "--rw=randwrite", "--size=64M", "--io_size=16M",
        "--verify=crc32c", "--verify_state_save=0", "--output-format=terse")
    seen = hashlib.sha256(mp.read_bytes()).hexdigest()
    mon.ok("block-export-del", id="e0")
    mon.wait_event("BLOCK_EXPORT_DELETED", timeout=30)
    data = exported(ceph_cluster, image, fuse_dir / "export.raw")
    assert len(data) == 64 * MiB
    assert data.count(0) < len(data) * 0.85         # fio's 16 MiB are there
    assert hashlib.sha256(data).hexdigest() == seen


def test_qcow2_convert_through_nbd(ceph_cluster: CephCluster, fuse_dir: Path,
                                   start_qsd: QsdFactory) -> None:
    """qemu-img convert -n of a qcow2 image into an rbd node exported over NBD gives an
    image that Ceph reads back byte-identical; unmapped zeroes become holes that block
    status reports (librbd's object map) through the export."""
    src = fuse_dir / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 5M 64k",
        "-c", "write -z 8M 1M", "-c", "write -P 0x33 31M 1M", str(src))
    reference = fuse_dir / "ref.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(reference))
    # The rbd image starts full of other data: every byte must be written over.
    junk = fuse_dir / "junk.raw"
    junk.write_bytes(os.urandom(32 * MiB))
    image = f"t-{uuid.uuid4().hex[:12]}"
    ceph_cluster.rbd("import", "--no-progress", str(junk), f"rbd/{image}")
    sock = fuse_dir / "nbd.sock"
    daemon = start_qsd("--blockdev", rbd_node(ceph_cluster, image, extra=",discard=unmap"),
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "nbd,id=e0,node-name=r0,writable=on")
    Monitor(daemon)        # the greeting comes once the command line is applied
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src),
        nbd_uri(sock, "r0"))
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw",
                             nbd_uri(sock, "r0")))

    def at(offset: int) -> dict[str, object]:
        return next(e for e in extents if e["start"] <= offset < e["start"] + e["length"])

    assert at(0)["data"] is True and at(31 * MiB)["data"] is True
    assert at(12 * MiB)["data"] is False and at(12 * MiB)["zero"] is True
    daemon.stop()
    assert exported(ceph_cluster, image, fuse_dir / "export.raw") == reference.read_bytes()


def test_requests_resize_and_snapshots(ceph_cluster: CephCluster, fuse_dir: Path,
                                       start_qsd: QsdFactory) -> None:
    """Zero-writes (allocating and unmapping), discards, flushes and a resize through
    the driver, each checked in the cluster; a snapshot opens read-only with the data
    it kept."""
    image = new_image(ceph_cluster, "16M")
    sock = fuse_dir / "nbd.sock"
    daemon = start_qsd("--blockdev", rbd_node(ceph_cluster, image, extra=",discard=unmap"),
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "nbd,id=e0,node-name=r0,writable=on")
    mon = Monitor(daemon)
    uri = nbd_uri(sock, "r0")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 16M", "-c", "flush", uri)
    ceph_cluster.rbd("snap", "create", f"rbd/{image}@before")
    run("qemu-io", "-f", "raw", "-c", "write -z 0 1M", "-c", "write -z -u 4M 4M",
        "-c", "discard 12M 4M", "-c", "write -P 0x55 9M 4k", "-c", "flush", uri)
    mon.ok("block-export-del", id="e0")       # an NBD export does not share resizing
    mon.wait_event("BLOCK_EXPORT_DELETED", timeout=30)
    mon.ok("block_resize", **{"node-name": "r0"}, size=24 * MiB)
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"rbd/{image}"))
    assert info["size"] == 24 * MiB
    node = next(n for n in mon.ok("query-named-block-nodes") if n["node-name"] == "r0")
    assert node["image"]["virtual-size"] == 24 * MiB
    assert [s["name"] for s in node["image"]["snapshots"]] == ["before"]
    expected = bytearray(b"\xaa" * 16 * MiB + bytes(8 * MiB))
    expected[0:MiB] = bytes(MiB)
    expected[4 * MiB:8 * MiB] = bytes(4 * MiB)
    expected[12 * MiB:16 * MiB] = bytes(4 * MiB)
    expected[9 * MiB:9 * MiB + 4096] = b"\x55" * 4096
    assert exported(ceph_cluster, image, fuse_dir / "export.raw") == expected
    # The snapshot: refused read-write, as in QEMU; read-only it shows the old data.
    assert mon.err("blockdev-add", driver="rbd", **{"node-name": "s0"}, pool="rbd",
                   image=image, conf=str(ceph_cluster.conf),
                   snapshot="before") == "rbd snapshots are read-only"
    mon.ok("blockdev-add", driver="rbd", **{"node-name": "s0", "auto-read-only": True},
           pool="rbd", image=image, conf=str(ceph_cluster.conf), snapshot="before")
    mon.ok("block-export-add", type="nbd", id="e1", **{"node-name": "s0"})
    old = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xaa 0 16M", nbd_uri(sock, "s0"))
    assert "read 16777216/16777216 bytes" in old
    node = next(n for n in mon.ok("query-named-block-nodes") if n["node-name"] == "s0")
    assert node["ro"] is True


def _mon_port(conf: Path) -> str:
    line = next(line for line in conf.read_text().splitlines() if line.startswith("mon_host"))
    return line.rsplit(":", 1)[1]


def _admin_key(conf: Path) -> str:
    section = (conf.parent / "keyring").read_text().split("[client.admin]")[1]
    return next(line.split("=", 1)[1].strip() for line in section.splitlines()
                if line.strip().startswith("key ="))


def test_open_errors_as_qemu(ceph_cluster: CephCluster, start_qsd: QsdFactory) -> None:
    """blockdev-add of rbd nodes that cannot open: the texts 11.1.3 gives for the same
    cluster; a monitor address and a key from a secret object instead of a conf file;
    encryption refused (librbd's encryption is not reachable from qsd)."""
    image = new_image(ceph_cluster, "8M")
    conf = str(ceph_cluster.conf)
    daemon: Qsd = start_qsd("--object", f"secret,id=key0,format=base64,"
                                        f"data={_admin_key(ceph_cluster.conf)}")
    mon = Monitor(daemon)
    base = {"driver": "rbd", "node-name": "n"}
    cases: list[tuple[dict[str, object], str]] = [
        ({"pool": "rbd", "image": image, "conf": "/nonexistent.conf"},
         "error reading conf file /nonexistent.conf: No such file or directory"),
        ({"pool": "nope", "image": image, "conf": conf},
         "error opening pool nope: No such file or directory"),
        ({"pool": "rbd", "image": "nonexistent", "conf": conf},
         "error reading header from nonexistent: No such file or directory"),
        ({"pool": "rbd", "namespace": "ns", "image": image, "conf": conf},
         "namespace 'ns' does not exist"),
        ({"pool": "rbd", "image": image, "conf": conf, "key-secret": "nokey"},
         "No secret with id 'nokey'"),
        ({"pool": "rbd", "image": image, "conf": conf, "snapshot": "nosnap"},
         f"error reading header from {image}: No such file or directory"),
        ({"pool": "rbd", "image": image, "conf": conf, "encrypt": {"format": "luks"}},
         "Parameter 'encrypt.key-secret' is missing"),
        ({"pool": "rbd", "image": image, "conf": conf,
          "encrypt": {"format": "luks", "key-secret": "key0"}},
         "RBD library does not support image encryption"),
    ]
    for options, desc in cases:
        assert mon.err("blockdev-add", **base, **options) == desc, options
    assert mon.ok("query-named-block-nodes") == []
    mon.ok("blockdev-add", **base, pool="rbd", image=image, conf="/dev/null",
           server=[{"host": "127.0.0.1", "port": _mon_port(ceph_cluster.conf)}],
           **{"key-secret": "key0", "auth-client-required": ["cephx", "none"]})
    node = mon.ok("query-named-block-nodes")[0]
    assert node["image"]["virtual-size"] == 8 * MiB
    assert "actual-size" not in node["image"]
    assert node["image"]["format-specific"] == {"type": "rbd", "data": {}}
    assert node["image"]["cluster-size"] == 4 * MiB


def _create(mon: Monitor, job_id: str, options: dict[str, object]) -> str | None:
    """Runs blockdev-create to its end; the job's error, None when it succeeded."""
    mon.ok("blockdev-create", **{"job-id": job_id}, options=options)
    while True:
        event = mon.wait_event("JOB_STATUS_CHANGE", timeout=60)
        if event["data"] == {"id": job_id, "status": "concluded"}:
            break
    job = next(j for j in mon.ok("query-jobs") if j["id"] == job_id)
    mon.ok("job-dismiss", id=job_id)
    error: str | None = job.get("error")
    return error


def test_blockdev_create(ceph_cluster: CephCluster, start_qsd: QsdFactory) -> None:
    """blockdev-create makes images of the size and object size asked for, and fails
    with 11.1.3's texts; a new image opens and reads back as zeroes."""
    mon = Monitor(start_qsd())
    name = f"t-{uuid.uuid4().hex[:12]}"
    location = {"pool": "rbd", "image": name, "conf": str(ceph_cluster.conf)}
    assert _create(mon, "c0", {"driver": "rbd", "location": location,
                               "size": 20 * MiB, "cluster-size": MiB}) is None
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"rbd/{name}"))
    assert (info["size"], info["order"]) == (20 * MiB, 20)
    errors = [
        ({"location": location, "size": MiB}, "error rbd create: File exists"),
        ({"location": {**location, "image": "x", "snapshot": "s"}, "size": MiB},
         "Can't use snapshot name for image creation"),
        ({"location": {**location, "image": "x"}, "size": MiB, "cluster-size": 3000},
         "obj size needs to be power of 2"),
        ({"location": {**location, "image": "x"}, "size": MiB, "cluster-size": 2048},
         "obj size too small"),
        ({"location": {**location, "pool": "nope"}, "size": MiB},
         "error opening pool nope: No such file or directory"),
    ]
    for i, (options, error) in enumerate(errors):
        assert _create(mon, f"e{i}", {"driver": "rbd", **options}) == error, options
    mon.ok("blockdev-add", driver="rbd", **{"node-name": "n"}, **location)
    node = mon.ok("query-named-block-nodes")[0]
    assert (node["image"]["virtual-size"], node["image"]["cluster-size"]) == (20 * MiB, MiB)
