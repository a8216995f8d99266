"""The wire as QEMU 11.1.3's daemon shows it, where qsd used to differ (issue #10).

Expected bytes are 11.1.3's, read off the real daemon (tests/compat has the transcripts).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import QsdFactory
from tests.harness import RawMonitor


def _negotiated(start_qsd: QsdFactory, *args: str) -> RawMonitor:
    raw = start_qsd(*args).connect_raw()
    raw.negotiate()
    return raw


def test_ids_are_echoed_as_qemu_prints_them(start_qsd: QsdFactory) -> None:
    raw = _negotiated(start_qsd)
    version = raw.command(b'{"execute": "query-version"}')
    for sent, echoed in [
        (b"1", b"1"), (b"100", b"100"), (b"1.0", b"1"), (b"0.1", b"0.10000000000000001"),
        (b"-0", b"0"), (b"-0.0", b"-0"), (b"1e999", b"inf"), (b"-1e999", b"-inf"),
        (b"1e17", b"1e+17"), (b"18446744073709551616", b"1.8446744073709552e+19"),
        (b'"\xc3\xa9"', b'"\\u00E9"'), (b'"\\u007f\\ud83d\\ude00"', b'"\\u007F\\uD83D\\uDE00"'),
        (b"1" * 5000, b"inf"),
    ]:
        reply = raw.command(b'{"execute": "query-version", "id": ' + sent + b"}")
        assert reply == version[:-1] + b', "id": ' + echoed + b"}", sent[:20]


def test_a_deeply_nested_id_is_echoed(start_qsd: QsdFactory) -> None:
    raw = _negotiated(start_qsd)
    nested = b"[" * 1023 + b"]" * 1023
    reply = raw.command(b'{"execute": "query-version", "id": ' + nested + b"}")
    assert reply.endswith(b', "id": ' + nested + b"}")
    assert raw.command(b'{"execute": "query-version", "id": 2}').endswith(b'"id": 2}')


def test_parse_errors_name_line_and_column(start_qsd: QsdFactory) -> None:
    raw = _negotiated(start_qsd)
    assert raw.command(b'{"a": 1, "a": 2}') == (
        b'{"error": {"class": "GenericError", "desc": "2:15: JSON parse error, duplicate key"}}')
    assert raw.command(b"  nonsense") == (
        b'{"error": {"class": "GenericError", '
        b'"desc": "3:3: JSON parse error, invalid keyword \'nonsense\'"}}')


def test_an_unfinished_request_at_eof_is_not_run(start_qsd: QsdFactory) -> None:
    daemon = start_qsd("--blockdev", "null-co,node-name=n0")
    raw = daemon.connect_raw()
    raw.negotiate()
    raw.send(b'{"execute": "blockdev-del", "arguments": {"node-name": "n0"}')
    raw.sock.shutdown(1)
    assert raw.sock.recv(100) == b""
    raw.close()
    again = daemon.connect_raw()
    again.negotiate()
    assert again.command(b'{"execute": "blockdev-del", "arguments": {"node-name": "n0"}}') \
        == b'{"return": {}}'


def _events_then_return(raw: RawMonitor, command: bytes) -> tuple[list[str], bytes]:
    raw.send(command + b"\n")
    events = []
    while (line := raw.recv_line()).startswith(b'{"timestamp"'):
        message = json.loads(line)
        events.append(message["data"]["id"])
    return events, line


def test_idle_nbd_export_is_deleted_before_the_return(start_qsd: QsdFactory,
                                                     tmp_path: Path) -> None:
    raw = _negotiated(start_qsd, "--blockdev", "null-co,node-name=n0", "--nbd-server",
                      f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
                      "--export", "nbd,id=e0,node-name=n0")
    events, reply = _events_then_return(
        raw, b'{"execute": "block-export-del", "arguments": {"id": "e0"}}')
    assert (events, reply) == (["e0"], b'{"return": {}}')


def test_idle_fuse_export_is_deleted_before_the_return(start_qsd: QsdFactory,
                                                      tmp_path: Path) -> None:
    mountpoint = tmp_path / "disk"
    mountpoint.touch()
    raw = _negotiated(start_qsd, "--blockdev", "null-co,node-name=n0",
                      "--export", f"fuse,id=e0,node-name=n0,mountpoint={mountpoint}")
    events, reply = _events_then_return(
        raw, b'{"execute": "block-export-del", "arguments": {"id": "e0"}}')
    assert (events, reply) == (["e0"], b'{"return": {}}')


def test_nbd_server_stop_deletes_idle_exports_newest_first(start_qsd: QsdFactory,
                                                          tmp_path: Path) -> None:
    raw = _negotiated(start_qsd, "--blockdev", "null-co,node-name=n0", "--nbd-server",
                      f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
                      "--export", "nbd,id=a1,node-name=n0,name=a1",
                      "--export", "nbd,id=a2,node-name=n0,name=a2",
                      "--export", "nbd,id=a3,node-name=n0,name=a3")
    events, reply = _events_then_return(raw, b'{"execute": "nbd-server-stop"}')
    assert (events, reply) == (["a3", "a2", "a1"], b'{"return": {}}')


# QEMU's input limits (qobject/json-streamer.c), written out here so that the test does
# not take them from the code it checks.
MAX_TOKEN_SIZE = 64 << 20
MAX_NESTING = 1024
_ID_PREFIX = b'{"execute": "query-version", "id": '
# The tokens of `{"execute": "query-version", "id": X}` besides X, in bytes: a token counts
# with its whole text, and the spaces between tokens are not tokens.
_FRAME_TOKEN_SIZE = len(b'{"execute":"query-version","id":}')
_SIZE_ERROR = b'{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}'
_NESTING_ERROR = (
    b'{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}')


def _long_line(raw: RawMonitor) -> bytes:
    """The next reply however long (RawMonitor's buffering is for short ones)."""
    chunks = [raw.buffer]
    while b"\n" not in chunks[-1]:
        chunk = raw.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("monitor closed the connection")
        chunks.append(chunk)
    line, _, raw.buffer = b"".join(chunks).partition(b"\r\n")
    return line


def _echo_number(text: str) -> str:
    """11.1.3's rule: an integer within int64 or uint64 is echoed in full; any other
    number becomes a double, printed with %.17g (``inf`` past its range)."""
    digits = text.removeprefix("-")
    if digits.isdigit() and len(digits) <= 20 and -(1 << 63) <= int(text) < 1 << 64:
        return str(int(text))
    return f"{float(text):.17g}"  # C's %.17g


_NUMBERS = st.one_of(
    st.one_of(st.integers(-(1 << 63) - 2, -(1 << 63) + 2),
              st.integers((1 << 63) - 2, (1 << 63) + 2),
              st.integers((1 << 64) - 2, (1 << 64) + 2), st.integers()).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds("{}{}e{}".format, st.sampled_from(["", "-"]), st.integers(1, 9),
              st.integers(-400, 400)),
    st.builds(lambda sign, count: sign + "9" * count, st.sampled_from(["", "-"]),
              st.integers(300, 5000)),
)
_LIMIT_CASES = st.one_of(
    st.tuples(st.just("number"), _NUMBERS),
    st.tuples(st.just("nesting"), st.integers(MAX_NESTING - 3, MAX_NESTING + 3)),
    st.tuples(st.just("string"), st.integers(-2, 1)),
)


def test_numbers_strings_and_nesting_at_and_past_the_limits(start_qsd: QsdFactory) -> None:
    """Every request at or past QEMU's limits gets 11.1.3's answer, and the same
    monitor goes on serving."""
    raw = _negotiated(start_qsd)
    raw.sock.settimeout(120)
    version = raw.command(b'{"execute": "query-version"}')

    def echoed(sent: bytes) -> bytes:
        return version[:-1] + b', "id": ' + sent + b"}"

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=_LIMIT_CASES)
    def check(case: tuple[str, str | int]) -> None:
        kind, arg = case
        if isinstance(arg, str):
            sent, expected = arg.encode(), echoed(_echo_number(arg).encode())
        elif kind == "nesting":
            sent = b"[" * arg + b"]" * arg
            # the request's own braces are one level
            expected = _NESTING_ERROR if arg + 1 > MAX_NESTING else echoed(sent)
        else:
            total = MAX_TOKEN_SIZE + arg
            sent = b'"' + b"x" * (total - _FRAME_TOKEN_SIZE - 2) + b'"'
            # 11.1.3 refuses a request whose tokens add up to exactly 64 MiB
            expected = _SIZE_ERROR if total >= MAX_TOKEN_SIZE else echoed(sent)
        raw.send(_ID_PREFIX + sent + b"}\n")
        assert _long_line(raw) == expected, (kind, arg)
        assert raw.command(b'{"execute": "query-version"}') == version

    check()


def test_other_monitors_are_served_while_a_huge_request_is_rejected(
        start_qsd: QsdFactory) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="qsd-", dir="/tmp"))
    try:
        second = sock_dir / "m1.sock"
        daemon = start_qsd("--chardev", f"socket,id=m1,path={second},server=on,wait=off",
                           "--monitor", "m1")
        huge = daemon.connect_raw()
        huge.negotiate()
        other = RawMonitor(second)
        other.negotiate()
        request = _ID_PREFIX + b'"' + b"x" * (70 << 20) + b'"}\n'
        replies: list[bytes] = []

        def send_huge() -> None:
            huge.sock.settimeout(120)
            huge.send(request)
            replies.append(huge.recv_line())

        sender = threading.Thread(target=send_huge)
        sender.start()
        round_trips = []
        while sender.is_alive():
            started = time.monotonic()
            assert other.command(b'{"execute": "query-version"}').startswith(b'{"return": ')
            round_trips.append(time.monotonic() - started)
        sender.join()
        assert replies == [_SIZE_ERROR]
        # On a loaded machine a single round trip may wait for the CPU; the typical one
        # must not wait for the huge request.
        assert round_trips and statistics.median(round_trips) < 0.1, round_trips
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
