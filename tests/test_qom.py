"""The object model: qom-* over a real daemon, object-add through property setters, and
the order facts the listings rely on. Expected replies were recorded from QEMU 11.1.3's
daemon with the same commands (the harness's monitor has no id: compat_monitor0).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qsd import qapi
from qsd.commands import qom as qom_commands
from qsd.qapi import generated
from qsd.qapi.hashorder import qdict_order
from qsd.qom.model import (
    TYPE_MODULES,
    all_types,
    class_properties,
    creatable_class,
    type_by_name,
)
from tests.conftest import QsdFactory
from tests.harness import Monitor, RawMonitor, fuse_mounts

IOTHREAD_PROPERTIES = [
    ("type", "string"), ("thread-pool-min", "int"), ("aio-max-batch", "int"),
    ("thread-pool-max", "int"), ("poll-max-ns", "int"), ("poll-weight", "int"),
    ("poll-grow", "int"), ("poll-shrink", "int")]
THROTTLE_GROUP_PROPERTIES = [
    "type", "x-bps-write-max-length", "x-iops-total-max-length", "x-iops-size", "limits",
    "x-bps-total", "x-iops-read-max-length", "x-bps-write", "x-iops-write-max-length",
    "x-bps-read-max", "x-iops-read-max", "x-bps-total-max", "x-bps-read-max-length",
    "x-iops-read", "x-bps-read", "x-bps-write-max", "x-iops-total-max", "x-iops-total",
    "x-iops-write", "x-bps-total-max-length", "x-iops-write-max"]
DEFAULT_LIMITS = {
    f"{kind}-{direction}{suffix}": 1 if suffix == "-max-length" else 0
    for kind in ("bps", "iops") for direction in ("total", "read", "write")
    for suffix in ("", "-max", "-max-length")} | {"iops-size": 0}


@pytest.fixture
def monitor(start_qsd: QsdFactory) -> Iterator[Monitor]:
    qsd = start_qsd("--object", "iothread,id=io0")
    mon = Monitor(qsd)
    yield mon
    mon.raw.close()


def test_listing_orders_are_qemus() -> None:
    """Class properties come out in QEMU's hash-table order, computed from the order
    its class_init adds them."""
    iothread = type_by_name("iothread")
    group = type_by_name("throttle-group")
    assert iothread is not None and group is not None
    assert class_properties(iothread) == IOTHREAD_PROPERTIES
    assert [name for name, _ in class_properties(group)] == THROTTLE_GROUP_PROPERTIES


def test_every_type_has_a_place_in_qemus_type_order() -> None:
    order = qom_commands._TYPE_ORDER
    assert {cls.name for cls in all_types()} <= set(order)


def test_every_creatable_type_has_its_module() -> None:
    """object-add imports a type's module by name (start-up loads no other)."""
    assert set(TYPE_MODULES) == {value.value for value in generated.ObjectType}


def test_object_add_members_are_properties() -> None:
    """object-add sets each member through the property of the same name, so every
    member of every ObjectOptions branch must be a settable property."""
    for value, variant in generated.ObjectOptions.__qapi_variants__.items():
        cls = creatable_class(value)
        assert cls is not None, value
        for member in variant.__qapi_members__[2:]:
            prop = cls.qom_class.find_property(member.wire)
            assert prop is not None and prop.set is not None, (value, member.wire)
            assert prop.qapi == member.type, (value, member.wire)


def test_properties_are_set_in_qdict_order() -> None:
    """QEMU sets properties in the QDict order of object-add's arguments: a limit given
    both ways takes the value of the one set last."""
    opts = qapi.parse_type("ObjectOptions", {"qom-type": "throttle-group", "id": "t",
                                             "limits": {"bps-total": 200},
                                             "x-bps-total": 100})
    order = qdict_order(name for name, _ in qapi.present_members(opts))
    assert order.index("limits") < order.index("x-bps-total")


def test_iothread_properties_change_while_running(monitor: Monitor) -> None:
    got = monitor.ok("qom-list-get", paths=["/objects/io0"])
    assert got == [{"properties": [
        {"name": name, "type": kind, "value": value}
        for (name, kind), value in zip(IOTHREAD_PROPERTIES,
                                       ["iothread", 0, 0, 64, 32768, 3, 2, 2], strict=True)]}]
    for prop, value in (("poll-max-ns", 1000), ("poll-grow", 4), ("poll-shrink", 8),
                        ("poll-weight", 7), ("aio-max-batch", 16), ("thread-pool-max", 8)):
        assert monitor.ok("qom-set", path="/objects/io0", property=prop, value=value) == {}
        assert monitor.ok("qom-get", path="io0", property=prop) == value
    # 0 stands for the default and reads as it
    monitor.ok("qom-set", path="/objects/io0", property="poll-grow", value=0)
    assert monitor.ok("qom-get", path="/objects/io0", property="poll-grow") == 2
    # A refused combination keeps the value, as in QEMU
    assert (monitor.err("qom-set", path="/objects/io0", property="thread-pool-min", value=100)
            == "bad thread-pool-min/thread-pool-max values")
    assert monitor.ok("qom-get", path="/objects/io0", property="thread-pool-min") == 100
    assert (monitor.err("qom-set", path="/objects/io0", property="poll-max-ns", value=-1)
            == "poll-max-ns value must be in range [0, 9223372036854775807]")
    assert (monitor.err("qom-set", path="/objects/io0", property="poll-weight", value=64)
            == "poll-weight value must be in range [0, 63]")


@pytest.mark.parametrize(("command", "args", "error"), [
    ("qom-get", {"path": "/objects/io0", "property": "nope"},
     ("GenericError", "Property 'iothread.nope' not found")),
    ("qom-get", {"path": "/objects/nope", "property": "type"},
     ("DeviceNotFound", "Device '/objects/nope' not found")),
    ("qom-get", {"path": "", "property": "type"}, ("DeviceNotFound", "Device '' not found")),
    ("qom-list", {"path": ""}, ("GenericError", "Path '' is ambiguous")),
    ("qom-list", {"path": "/objects/../objects"},
     ("DeviceNotFound", "Device '/objects/../objects' not found")),
    ("qom-list-get", {"paths": ["/objects/io0", "/nope"]},
     ("DeviceNotFound", "Device '/nope' not found")),
    ("qom-set", {"path": "/objects/io0", "property": "type", "value": "x"},
     ("GenericError", "Property 'iothread.type' is not writable")),
    ("qom-set", {"path": "/objects", "property": "io0", "value": "x"},
     ("GenericError", "Property 'container.io0' is not writable")),
    ("qom-set", {"path": "/", "property": "nope", "value": 1},
     ("GenericError", "Property 'container.nope' not found")),
    ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": 1.5},
     ("GenericError", "Invalid parameter type for 'poll-max-ns', expected: integer")),
    ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": 1 << 63},
     ("GenericError", "Invalid parameter type for 'poll-max-ns', expected: integer")),
    ("qom-list-properties", {"typename": "nope"},
     ("DeviceNotFound", "Class 'nope' not found")),
    ("qom-list-properties", {"typename": "user-creatable"},
     ("GenericError", "Parameter 'typename' expects a QOM type")),
])
def test_qom_errors(monitor: Monitor, command: str, args: dict[str, Any],
                    error: tuple[str, str]) -> None:
    reply = monitor.cmd(command, **args)
    assert (reply["error"]["class"], reply["error"]["desc"]) == error


def test_paths(monitor: Monitor) -> None:
    listing = [{"name": "type", "type": "string"}, {"name": "io0", "type": "child<iothread>"},
               {"name": "compat_monitor0", "type": "child<monitor-qmp>"}]
    for path in ("/objects", "//objects/", "objects"):
        assert monitor.ok("qom-list", path=path) == listing
    assert monitor.ok("qom-list", path="/") == [
        {"name": "type", "type": "string"}, {"name": "backend", "type": "child<container>"},
        {"name": "objects", "type": "child<container>"},
        {"name": "chardevs", "type": "child<container>"},
        {"name": "audiodevs", "type": "child<container>"}]
    assert monitor.ok("qom-get", path="/", property="objects") == "/objects"
    assert monitor.ok("qom-get", path="/objects", property="io0") == "/objects/io0"
    assert monitor.ok("qom-get", path="/objects", property="type") == "container"


def test_objects_listed_in_qemus_order(monitor: Monitor) -> None:
    """Children come out in GHashTable order, which depends on every addition and
    removal, failed additions included."""
    for name in ("tg0", "tg1", "tg2"):
        monitor.ok("object-add", **{"qom-type": "throttle-group", "id": name})
    assert "iops size" in monitor.err("object-add", **{"qom-type": "throttle-group",
                                                        "id": "tg3", "x-iops-size": 4})
    monitor.ok("object-add", **{"qom-type": "throttle-group", "id": "tg3"})
    monitor.ok("object-del", id="tg1")
    names = [entry["name"] for entry in monitor.ok("qom-list", path="/objects")]
    assert names == ["type", "tg3", "io0", "tg2", "compat_monitor0", "tg0"]


def test_throttle_group_limits(monitor: Monitor) -> None:
    add = {"qom-type": "throttle-group", "id": "tg"}
    monitor.ok("object-add", **add, limits={"bps-total": 100, "bps-total-max": 200,
                                            "bps-total-max-length": 5, "iops-read": 3,
                                            "iops-size": 4096})
    assert monitor.ok("qom-get", path="/objects/tg", property="limits") == DEFAULT_LIMITS | {
        "bps-total": 100, "bps-total-max": 200, "bps-total-max-length": 5, "iops-read": 3,
        "iops-size": 4096}
    assert monitor.ok("qom-get", path="/objects/tg", property="x-bps-total-max-length") == 5
    # x- properties only while creating; limits at any time, validated as a whole
    assert (monitor.err("qom-set", path="/objects/tg", property="x-bps-total", value="x")
            == "Property cannot be set after initialization")
    assert (monitor.err("qom-set", path="/objects/tg", property="limits",
                        value={"bps-read": 10})
            == "bps/iops/max total values and read/write values cannot be used at the same time")
    assert monitor.ok("qom-get", path="/objects/tg", property="x-bps-read") == 0
    monitor.ok("qom-set", path="/objects/tg", property="limits",
               value={"bps-total": 0, "bps-total-max": 0, "bps-total-max-length": 1,
                      "bps-read": 10})
    assert monitor.ok("qom-get", path="/objects/tg", property="x-bps-read") == 10
    # both spellings at creation: the one QEMU sets last wins
    monitor.ok("object-add", **{"qom-type": "throttle-group", "id": "both",
                                "x-bps-total": 100, "limits": {"bps-total": 200}})
    assert monitor.ok("qom-get", path="both", property="x-bps-total") == 100


@pytest.mark.parametrize(("args", "error"), [
    ({"x-bps-total": -1}, "Property values cannot be negative"),
    ({"x-bps-total": 5, "x-bps-read": 5},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"x-bps-total-max-length": 1 << 32},
     "x-bps-total-max-length value must be in therange [0, 4294967295]"),
    ({"limits": {"bps-write-max-length": 1 << 32, "bps-read-max-length": 1 << 32}},
     "bps-read-max-length value must be in the range [0, 4294967295]"),
    ({"x-bps-total-max-length": 0}, "the burst length cannot be 0"),
    ({"x-iops-size": 10}, "iops size requires an iops value to be set"),
    ({"x-bps-total": 10 ** 15 + 1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"limits": {"bps-total": -4}}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"limits": {"bps-total-max-length": -4}}, "burst length set without burst rate"),
    ({"limits": {"bps-total": 1, "bps-total-max": 2, "bps-total-max-length": -1}},
     "burst length too high for this burst rate"),
    ({"limits": {"bps-total-max": 100}},
     "bps_max/iops_max require corresponding bps/iops values"),
    ({"limits": {"bps-total": 200, "bps-total-max": 100}},
     "bps_max/iops_max cannot be lower than bps/iops"),
    ({"x-bps-total": "x"}, "Invalid parameter type for 'x-bps-total', expected: integer"),
    ({"limits": {"nope": 1}}, "Parameter 'limits.nope' is unexpected"),
    ({"x-bps-total": -1, "id": "io0"}, "Property values cannot be negative"),
    ({"id": "io0"}, "attempt to add duplicate property 'io0' to object (type 'container')"),
])
def test_throttle_group_errors(monitor: Monitor, args: dict[str, Any], error: str) -> None:
    options = {"qom-type": "throttle-group", "id": "tg"} | args
    assert monitor.err("object-add", **options) == error
    names = [entry["name"] for entry in monitor.ok("qom-list", path="/objects")]
    assert names == ["type", "io0", "compat_monitor0"]


def test_object_on_the_command_line(start_qsd: QsdFactory) -> None:
    qsd = start_qsd("--object", "throttle-group,id=tg,limits.iops-total=50,x-iops-size=512")
    mon = Monitor(qsd)
    assert mon.ok("qom-get", path="tg", property="limits") == DEFAULT_LIMITS | {
        "iops-total": 50, "iops-size": 512}
    mon.raw.close()
    bad = start_qsd("--object", "throttle-group,id=tg,x-bps-total=-1", monitor=False)
    assert bad.wait() == 1
    bad.stop()
    assert bad.stderr.decode() == ("qsd: --object throttle-group,id=tg,x-bps-total=-1: "
                                   "Property values cannot be negative\n")


def test_qom_list_types(monitor: Monitor) -> None:
    assert monitor.ok("qom-list-types", implements="authz") == [
        {"name": "authz-simple", "parent": "authz"},
        {"name": "authz-list-file", "parent": "authz"},
        {"name": "authz-list", "parent": "authz"}]
    assert monitor.ok("qom-list-types", implements="event-loop-base", abstract=True) == [
        {"name": "iothread", "parent": "event-loop-base"},
        {"name": "main-loop", "parent": "event-loop-base"},
        {"abstract": True, "name": "event-loop-base", "parent": "object"}]
    assert monitor.ok("qom-list-types", implements="nope") == []
    creatable = monitor.ok("qom-list-types", implements="user-creatable")
    assert {"name": "throttle-group", "parent": "object"} in creatable
    assert all("abstract" not in entry for entry in creatable)


def _thread_cpu_seconds(pid: int, name: str) -> float:
    """User plus system time of the daemon's thread called ``name``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == name:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    raise AssertionError(f"no thread {name}")


def _busy_fraction(pid: int, path: Path, seconds: float = 1.5) -> float:
    """How busy the iothread is while a reader sends it one small request every 5 ms:
    polling between requests keeps it busy, sleeping does not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start_cpu, start = _thread_cpu_seconds(pid, "io0"), time.monotonic()
        while time.monotonic() - start < seconds:
            os.pread(fd, 4096, 0)
            time.sleep(0.005)
        return (_thread_cpu_seconds(pid, "io0") - start_cpu) / (time.monotonic() - start)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="needs root and /dev/fuse")
def test_poll_max_ns_reaches_the_fuse_queue(start_qsd: QsdFactory,
                                            fuse_dir: Path) -> None:
    image, mountpoint = fuse_dir / "disk.raw", fuse_dir / "mnt"
    image.write_bytes(bytes(1 << 20))
    mountpoint.touch()
    qsd = start_qsd("--object", "iothread,id=io0,poll-max-ns=0",
                    "--blockdev", f"file,node-name=f0,filename={image}",
                    "--export", f"fuse,id=e0,node-name=f0,mountpoint={mountpoint},iothread=io0")
    mon = Monitor(qsd)
    assert str(mountpoint) in fuse_mounts()
    quiet = _busy_fraction(qsd.pid, mountpoint)
    mon.ok("qom-set", path="/objects/io0", property="poll-max-ns", value=200_000_000)
    assert mon.ok("qom-get", path="/objects/io0", property="poll-max-ns") == 200_000_000
    polling = _busy_fraction(qsd.pid, mountpoint)
    mon.ok("qom-set", path="/objects/io0", property="poll-max-ns", value=0)
    quiet_again = _busy_fraction(qsd.pid, mountpoint)
    mon.raw.close()
    assert polling > 0.1, (quiet, polling, quiet_again)
    assert quiet < polling / 4 and quiet_again < polling / 4, (quiet, polling, quiet_again)


def test_main_loop(monitor: Monitor) -> None:
    """One main-loop object at most; its parameters are checked at once (the main loop
    always runs), and it cannot be deleted."""
    add = {"qom-type": "main-loop"}
    assert (monitor.err("object-add", **add, id="ml0", **{"thread-pool-max": 0})
            == "bad thread-pool-min/thread-pool-max values")
    monitor.ok("object-add", **add, id="ml0")
    assert (monitor.err("object-add", **add, id="ml1", **{"thread-pool-max": 0})
            == "bad thread-pool-min/thread-pool-max values")
    assert monitor.err("object-add", **add, id="ml1") == "only one main-loop instance allowed"
    assert monitor.ok("qom-list", path="/objects/ml0") == [
        {"name": name, "type": kind} for name, kind in IOTHREAD_PROPERTIES[:4]]
    assert (monitor.err("qom-set", path="/objects/ml0", property="thread-pool-min", value=100)
            == "bad thread-pool-min/thread-pool-max values")
    assert monitor.err("object-del", id="ml0") == "Deleting main loop 'ml0' is not supported"


def test_monitors_and_chardevs_in_the_tree(start_qsd: QsdFactory, tmp_path: Path) -> None:
    """Monitors are objects (compat_monitorN without an id), chardevs the children of
    /chardevs; deleting a monitor frees its chardev, the current one refuses."""
    sock = Path(qsd_sock_dir := tempfile.mkdtemp(prefix="qsd-qom-", dir="/tmp")) / "m1.sock"
    try:
        qsd = start_qsd("--chardev", f"socket,id=c1,path={sock},server=on,wait=off",
                        "--chardev", "null,id=c2", "--monitor", "c1,id=mon1",
                        "--monitor", "c2")
        mon = Monitor(qsd)
        assert mon.ok("qom-list", path="/objects") == [
            {"name": "type", "type": "string"},
            {"name": "compat_monitor1", "type": "child<monitor-qmp>"},
            {"name": "mon1", "type": "child<monitor-qmp>"},
            {"name": "compat_monitor0", "type": "child<monitor-qmp>"}]
        assert mon.ok("qom-list-get", paths=["mon1"]) == [{"properties": [
            {"name": "type", "type": "string", "value": "monitor-qmp"},
            {"name": "chardev", "type": "string", "value": "c1"},
            {"name": "pretty", "type": "bool", "value": False},
            {"name": "close-action", "type": "MonitorQMPCloseAction", "value": "none"}]}]
        assert [e["name"] for e in mon.ok("qom-list", path="/chardevs")] == [
            "type", "c2", "qmp0", "c1"]
        assert mon.ok("qom-list", path="c1") == [
            {"name": "type", "type": "string"}, {"name": "connected", "type": "bool"},
            {"name": "addr", "type": "SocketAddress"}]
        assert mon.ok("qom-get", path="/chardevs/c1", property="addr") == {
            "type": "unix", "path": str(sock)}
        assert mon.ok("qom-get", path="/chardevs/qmp0", property="connected") is True
        assert (mon.err("qom-set", path="/chardevs/c1", property="connected", value=True)
                == "Property 'chardev-socket.connected' is not writable")
        assert (mon.err("object-del", id="compat_monitor0")
                == "Cannot delete the current QMP monitor")
        # Deleting a monitor frees its chardev. Its client's connection ends (QEMU
        # 11.1.3 keeps it open and stops answering: a deliberate difference).
        other = RawMonitor(sock)
        other.negotiate()
        mon.ok("object-del", id="mon1")
        with pytest.raises(ConnectionError):
            other.recv_line()
        other.close()
        mon.ok("object-del", id="compat_monitor1")
        frontends = {c["label"]: c["frontend-open"] for c in mon.ok("query-chardev")}
        assert frontends == {"c1": False, "qmp0": True, "c2": False}
        mon.ok("chardev-remove", id="c2")
        mon.ok("chardev-remove", id="c1")
        assert [e["name"] for e in mon.ok("qom-list", path="/objects")] == [
            "type", "compat_monitor0"]
        mon.raw.close()
    finally:
        shutil.rmtree(qsd_sock_dir, ignore_errors=True)
