"""Real QMP clients against a real daemon: qemu.qmp's QMPClient and qmp-shell."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.conftest import QsdFactory
from tests.harness import RawMonitor

QMP_SHELL = Path(sys.executable).parent / "qmp-shell"


async def test_qmpclient_commands_and_events(start_qsd: QsdFactory, tmp_path: Path) -> None:
    daemon = start_qsd("--blockdev", "null-co,node-name=n0",
                       "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock")
    client = QMPClient("test")
    await client.connect(str(daemon.qmp_path))
    try:
        version = await client.execute("query-version")
        assert version["qemu"] == {"major": 11, "minor": 1, "micro": 0}
        with pytest.raises(ExecuteError) as info:
            await client.execute("block-export-del", {"id": "missing"})
        assert info.value.error.error.class_ == "GenericError"
        assert info.value.error.error.desc == "Export 'missing' is not found"
        await client.execute("block-export-add",
                             {"type": "nbd", "id": "e0", "node-name": "n0"})
        listener = EventListener()
        with client.listen(listener):
            assert await client.execute("block-export-del", {"id": "e0"}) == {}
            event = await asyncio.wait_for(listener.get(), 10)
        assert event["event"] == "BLOCK_EXPORT_DELETED"
        assert event["data"] == {"id": "e0"}
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    finally:
        await client.disconnect()


def test_qmp_shell(start_qsd: QsdFactory) -> None:
    daemon = start_qsd("--blockdev", "null-co,node-name=n0")
    result = subprocess.run(
        [str(QMP_SHELL), str(daemon.qmp_path)],
        input="query-block-exports\nblock-export-del id=nothing\n",
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert '{"return": []}' in result.stdout
    assert "Export 'nothing' is not found" in result.stdout


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["execute", "arguments", "id", "exec-oob", "x"])
                      | st.text(max_size=5), children, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.harness import Qsd

    daemon = Qsd(tmp_path_factory.mktemp("fuzz"), [])
    yield daemon
    assert daemon.stop() == 0


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(JSON_VALUES.map(lambda v: json.dumps(v).encode())
                         .filter(lambda b: b"quit" not in b)
                         | st.binary(max_size=40).filter(lambda b: b"{" not in b
                                                         and b"[" not in b),
                         min_size=1, max_size=5))
def test_monitor_survives_random_input(shared_daemon, messages: list[bytes]  # type: ignore[no-untyped-def]
                                       ) -> None:
    """Each complete value gets one well-formed reply; garbage never kills the daemon."""
    raw = RawMonitor(shared_daemon.qmp_path)
    try:
        raw.negotiate()
        raw.send(b"\n".join(messages) + b"\n")
        # A marker command: every reply before it must be well-formed JSON objects.
        raw.send(b'{"execute": "query-version", "id": "marker"}\n')
        while True:
            reply = json.loads(raw.recv_line())
            assert isinstance(reply, dict)
            assert ("return" in reply) != ("error" in reply)
            if "error" in reply:
                assert set(reply["error"]) == {"class", "desc"}
            if reply.get("id") == "marker" and "return" in reply:
                break
    finally:
        raw.close()
    assert shared_daemon.proc.poll() is None
