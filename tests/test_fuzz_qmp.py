"""The QMP monitor fuzzed through a real daemon: the JSON stream parser and dispatch.

Each hypothesis example is one monitor connection that sends a run of messages: commands
whose arguments are drawn from the daemon's own ``query-qmp-schema`` (every command but
``quit``, arguments of the right types with values at their limits and, now and then,
of the wrong type, missing or extra), envelopes that break QEMU's rules, JSON values
that are no objects, and bytes that are no JSON; then a marker command.  What the
daemon must do:

- answer every request that carries an ``id`` exactly once, with ``return`` or an
  ``error`` of QEMU's classes, never an internal error (a handler that raised);
- answer everything else it could not parse with errors only, and the marker;
- print no traceback; and at the end, once everything the commands made is deleted
  again, hold no more fds, threads, FUSE mounts or asyncio tasks than before, and
  answer ``query-version`` on another monitor.

Nodes, images and sockets the commands make live in the daemon's directory, a small
tmpfs (whatever a command writes is bounded by it); host names are local ones.  A few
hundred examples in `make test`; QSD_FUZZ=1 (`make stress`) runs 20,000 (over 100,000
messages).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd.qapi.introspection import SCHEMA
from tests.harness import Monitor, Qsd, RawMonitor, wait_for_listener
from tests.leaks import Counters, assert_no_leaks, settled

EXAMPLES = 20000 if os.environ.get("QSD_FUZZ") == "1" else 300
ERROR_CLASSES = {"GenericError", "CommandNotFound", "DeviceNotFound", "DeviceNotActive",
                 "KVMMissingCap"}
TYPES = {entry["name"]: entry for entry in SCHEMA}
COMMANDS = {entry["name"]: entry["arg-type"] for entry in SCHEMA
            if entry["meta-type"] == "command" and entry["name"] != "quit"}
# Strings the daemon may know: ids the fuzz reuses, files in its directory, drivers.
WORDS = ["n0", "n1", "e0", "io0", "c0", "j0", "img.raw", "mnt", "disk", "qmp1", "", "x",
         "null-co", "file", "raw", "nbd", "fuse", "unix", "/objects", "/objects/io0",
         "iothread", "throttle-group", "secret", "on", "off", "127.0.0.1"]
# Members whose values reach the network or time: kept local and short.
LOCAL: dict[str, list[Any]] = {
    "host": ["127.0.0.1", "::1", "localhost"], "port": ["0", "1", "65536", "x"],
    "open-timeout": [0, 1], "reconnect-delay": [0, 1], "reconnect-ms": [0, 1000],
    "reconnect": [0, 1]}
INTS = [0, 1, -1, 511, 512, 4096, 65536, 1 << 20, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
        2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30]
NAMES = sorted(COMMANDS)


class Source:
    """The bytes hypothesis drew for one example, read as choices one after another
    (zeroes once they run out).  One draw per example: hypothesis spends its time on
    draws, and a schema walk makes hundreds of choices; bytes that shrink towards zero
    give the first command, each table's first value, required members only."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.at = 0

    def byte(self) -> int:
        self.at += 1
        return self.raw[self.at - 1] if self.at <= len(self.raw) else 0

    def bytes(self, n: int) -> bytes:
        return bytes(self.byte() for _ in range(n))

    def pick(self, table: list[Any]) -> Any:
        return table[self.byte() % len(table)]

    def int(self) -> int:
        b = self.byte()
        return INTS[b % len(INTS)] if b < 208 else int.from_bytes(self.bytes(8), "big",
                                                                   signed=True)

    def str(self) -> str:
        b = self.byte()
        if b < 224:
            return str(WORDS[b % len(WORDS)])
        # No slashes: every path is relative to the daemon's directory.  No NUL: a path
        # with one is a known failure (test_nul_in_paths).
        return self.bytes(b % 13).decode("utf-8", "replace").translate({0x2F: None, 0: None})

    def float(self) -> float:
        value = float(struct.unpack(">d", self.bytes(8))[0])
        return value if math.isfinite(value) else 0.5

    def json(self, depth: int = 0) -> Any:
        kind = self.byte() % (8 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.byte() & 1)
        if kind == 2:
            return self.int()
        if kind == 3:
            return self.float()
        if kind in (4, 5):
            return self.str()
        if kind == 6:
            return [self.json(depth + 1) for _ in range(self.byte() % 4)]
        return {self.str(): self.json(depth + 1) for _ in range(self.byte() % 4)}

    def value(self, type_name: str, depth: int = 0) -> Any:
        """A value of a schema type, or, one time in sixteen, of any type at all."""
        if depth >= 4 or self.byte() >= 240:
            return self.json(2)
        if type_name.startswith("["):
            return [self.value(type_name[1:-1], depth + 1) for _ in range(self.byte() % 4)]
        entry = TYPES[type_name]
        meta = entry["meta-type"]
        if meta == "builtin":
            return {"str": self.str, "int": self.int, "bool": lambda: bool(self.byte() & 1),
                    "null": lambda: None, "number": self.float,
                    "any": lambda: self.json(2)}[type_name]()
        if meta == "enum":
            b = self.byte()
            values = [v for v in entry["values"] if v != "rbd"]
            return values[b % len(values)] if b < 240 else self.str()
        if meta == "array":
            return [self.value(entry["element-type"], depth + 1)
                    for _ in range(self.byte() % 4)]
        if meta == "alternate":
            return self.value(self.pick(entry["members"])["type"], depth + 1)
        return self.object(type_name, depth + 1)

    def object(self, type_name: str, depth: int) -> dict[str, Any]:
        """An object of the type: its required members (most of the time), some optional
        ones, a branch's members for the tag it drew, and now and then an unknown one."""
        entry = TYPES[type_name]
        out: dict[str, Any] = {}
        for member in entry.get("members", []):
            name = member["name"]
            if self.byte() < (64 if "default" in member else 240):
                out[name] = self.pick(LOCAL[name]) if name in LOCAL \
                    else self.value(member["type"], depth)
        tag = entry.get("tag")
        if tag is not None and isinstance(out.get(tag), str):
            for variant in entry.get("variants", []):
                if variant["case"] == out[tag]:
                    out.update(self.object(variant["type"], depth))
        if self.byte() >= 240:
            out[self.str()] = self.json(2)
        return out

    def command(self) -> dict[str, Any]:
        """A request of the schema's commands, or of another name; its envelope now and
        then broken."""
        b = self.byte()
        name = NAMES[b % len(NAMES)] if b < 240 else self.str()
        message: dict[str, Any] = {"execute": name}
        if name in COMMANDS and TYPES[COMMANDS[name]].get("members"):
            message["arguments"] = self.object(COMMANDS[name], 0)
        shape = self.byte()
        if shape == 255:
            message["exec-oob"] = message.pop("execute")
        elif shape == 254:
            message["arguments"] = self.json(1)
        elif shape == 253:
            message[self.str()] = self.json(1)
        elif shape == 252:
            del message["execute"]
        return message


@dataclass(frozen=True)
class Message:
    data: bytes
    ids: tuple[str, ...]       # the ids of the requests in it that must be answered


_ids = itertools.count()


def _message(source: Source) -> Message:
    kind = source.byte()
    if kind < 208:
        command = source.command()
        if source.byte() >= 240:          # an id of any JSON type, not counted
            command["id"] = source.json(1)
            return Message(json.dumps(command).encode(), ())
        ident = f"fuzz-{next(_ids)}"
        command["id"] = ident
        return Message(json.dumps(command).encode(), (ident,))
    if kind < 240:
        return Message(json.dumps(source.json()).encode(), ())
    # Bytes that are no JSON; nothing that opens an object, array or string, which would
    # swallow what follows.
    garbage = bytes(b for b in source.bytes(source.byte() % 41) if b not in b"{[\"'")
    return Message(garbage, ())


def messages(raw: bytes) -> list[Message]:
    source = Source(raw)
    return [_message(source) for _ in range(1 + source.byte() % 6)]


@dataclass
class Daemon:
    qsd: Qsd
    second: Path
    examples: int = 0
    # Counters taken once the first tenth of the examples ran and what they made was
    # deleted: the first of each command builds its validators, imports its modules.
    before: Counters | None = None


def _cleanup(monitor: Monitor) -> None:
    """Deletes whatever the fuzz made: jobs, exports, the NBD server, nodes, objects,
    chardevs (not the monitors')."""
    deadline = time.monotonic() + 60
    while jobs := monitor.ok("query-jobs"):
        for job in jobs:
            if job["status"] == "concluded":
                monitor.cmd("job-dismiss", id=job["id"])
            else:
                monitor.cmd("job-cancel", id=job["id"])
        assert time.monotonic() < deadline, jobs
        time.sleep(0.05)
    for export in monitor.ok("query-block-exports"):
        monitor.cmd("block-export-del", id=export["id"], mode="hard")
    while monitor.ok("query-block-exports"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    monitor.cmd("nbd-server-stop")
    while nodes := monitor.ok("query-named-block-nodes", flat=True):
        for node in nodes:
            monitor.cmd("blockdev-del", **{"node-name": node["node-name"]})
        assert time.monotonic() < deadline, nodes
    for child in monitor.ok("qom-list", path="/objects"):
        # (the monitors are objects too: deleting one would silence it)
        if child["type"].startswith("child<") and child["type"] != "child<monitor-qmp>":
            monitor.cmd("object-del", id=child["name"])
    for chardev in monitor.ok("query-chardev"):
        if chardev["label"] not in ("qmp0", "qmp1"):
            monitor.cmd("chardev-remove", id=chardev["label"])


def _warm_up(monitor: Monitor) -> None:
    """What the fuzz will do anyway, done once before the counters are taken: the first
    of each kind of thing imports its modules and sizes its buffers."""
    monitor.ok("query-qmp-schema")
    monitor.ok("object-add", **{"qom-type": "iothread", "id": "io0"})
    monitor.ok("blockdev-add", driver="file", **{"node-name": "n0"}, filename="img.raw")
    monitor.ok("blockdev-add", driver="raw", **{"node-name": "n1"}, file="n0")
    monitor.ok("blockdev-add", driver="null-co", **{"node-name": "disk"})
    monitor.ok("nbd-server-start", addr={"type": "unix", "data": {"path": "nbd.sock"}})
    monitor.ok("block-export-add", type="nbd", id="e0", **{"node-name": "n1"})
    monitor.ok("block-export-add", type="fuse", id="e1", **{"node-name": "disk"},
               mountpoint="mnt", iothread="io0")
    monitor.ok("chardev-add", id="c0", backend={"type": "null", "data": {}})
    monitor.err("blockdev-add", driver="qcow2", **{"node-name": "q"}, file="n0")
    monitor.ok("qom-list", path="/objects")
    monitor.ok("qom-list-types")
    monitor.err("qom-list-properties", typename="x")      # loads every object type
    for name in NAMES:                                    # each command's own module
        monitor.cmd(name)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    tmp = Path(tempfile.mkdtemp(prefix="qsd-fuzz-qmp-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tmp)], check=True)
    try:
        (tmp / "img.raw").write_bytes(bytes(1 << 20))
        (tmp / "mnt").touch()
        second = tmp / "qmp1.sock"
        qsd = Qsd(tmp, ["--chardev", f"socket,id=qmp1,path={second},server=on,wait=off",
                        "--monitor", "qmp1"], probe=True)
        try:
            wait_for_listener(qsd.probe_path, qsd.proc)
            monitor = Monitor(qsd)
            _warm_up(monitor)
            _cleanup(monitor)
            monitor.raw.close()
            served = Daemon(qsd, second)
            yield served
            monitor = Monitor(qsd)
            _cleanup(monitor)
            monitor.raw.close()
            if served.before is not None:
                assert_no_leaks(qsd, served.before)
            other = RawMonitor(second)
            other.negotiate()
            reply = json.loads(other.command(b'{"execute": "query-version"}'))
            assert reply["return"]["qemu"]["major"] == 11
            other.close()
        finally:
            qsd.stop()
    finally:
        subprocess.run(["umount", "-l", str(tmp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(msgs=st.binary(min_size=1024, max_size=2048).map(messages))
def test_monitor(daemon: Daemon, msgs: list[Message]) -> None:
    daemon.examples += 1
    if daemon.examples == max(1, EXAMPLES // 10):
        monitor = Monitor(daemon.qsd)
        _cleanup(monitor)
        monitor.raw.close()
        daemon.before = settled(daemon.qsd)
    raw = RawMonitor(daemon.qsd.qmp_path)
    raw.sock.settimeout(60)
    try:
        raw.negotiate()
        raw.send(b"\n".join(m.data for m in msgs)
                 + b'\n{"execute": "query-version", "id": "marker"}\n')
        expected = {i for m in msgs for i in m.ids}
        answered: list[str] = []
        while True:
            reply = json.loads(raw.recv_line())
            assert isinstance(reply, dict), reply
            if "event" in reply:
                continue
            assert ("return" in reply) != ("error" in reply), reply
            assert set(reply) <= {"return", "error", "id"}, reply
            if "error" in reply:
                error = reply["error"]
                assert set(error) == {"class", "desc"} and error["class"] in ERROR_CLASSES
                assert not error["desc"].startswith("internal error"), error
            if reply.get("id") == "marker":
                assert "return" in reply
                break
            ident = reply.get("id")
            if isinstance(ident, str) and ident in expected:
                answered.append(ident)
            elif "return" in reply:
                # Only requests answer with a result; those without a counted id were
                # sent with an id of another type, which comes back as it was.
                assert "id" in reply, reply
        assert sorted(answered) == sorted(expected), (answered, expected)
    finally:
        raw.close()
    stderr = daemon.qsd.read_stderr()
    assert "Traceback" not in stderr, stderr
    assert daemon.qsd.proc.poll() is None


NUL_PATHS = [
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "a\0b"}}}),
    ("blockdev-add", {"driver": "file", "node-name": "f", "filename": "a\0b"}),
    ("chardev-add", {"id": "c", "backend": {"type": "file", "data": {"out": "a\0b"}}}),
    ("object-add", {"qom-type": "secret", "id": "s", "file": "a\0b"}),
]


@pytest.mark.xfail(strict=True, reason="a path with a NUL (JSON \\u0000) reaches the OS as "
                   "a Python str and raises ValueError: 'internal error in ...: embedded "
                   "null byte'; 11.1.3 keeps it as modified UTF-8 (C0 80) and uses it")
@pytest.mark.parametrize(("command", "arguments"), NUL_PATHS, ids=[c for c, _ in NUL_PATHS])
def test_nul_in_paths(daemon: Daemon, command: str, arguments: dict[str, Any]) -> None:
    """Found by this fuzzer: what 11.1.3 answers to paths with a NUL is no internal
    error (it creates ``a\\xc0\\x80b``)."""
    monitor = Monitor(daemon.qsd)
    try:
        reply = monitor.cmd(command, **arguments)
    finally:
        monitor.raw.close()
    assert "internal error" not in json.dumps(reply), reply
