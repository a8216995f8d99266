"""JSON output exactly as QEMU writes it.

QEMU stores objects in a QDict, a 512-bucket hash table keyed by ``tdb_hash`` whose buckets
are walked in order, newest entry first within a bucket.  Clients and regression scripts
that compare raw output see that order, so qsd reproduces it instead of Python's insertion
order.  Separators are QEMU's (``", "`` and ``": "``).  The monitor turns every ``\\n``
into ``\\r\\n`` on the way out, so each message ends in CRLF, pretty ones on every line.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable

_BUCKETS = 512
_MASK = 0xFFFFFFFF


@functools.lru_cache(maxsize=4096)
def _bucket(key: str) -> int:
    data = key.encode()
    value = (0x238F13AF * len(data)) & _MASK
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & _MASK
    return ((1103515243 * value + 12345) & _MASK) % _BUCKETS


def qdict_order(keys: Iterable[str]) -> list[str]:
    """The order in which QEMU iterates a QDict whose keys were inserted in ``keys`` order."""
    indexed = list(enumerate(keys))
    indexed.sort(key=lambda item: (_bucket(item[1]), -item[0]))
    return [key for _, key in indexed]


def _reorder(value: object) -> object:
    if isinstance(value, dict):
        return {key: _reorder(value[key]) for key in qdict_order(value)}
    if isinstance(value, list | tuple):
        return [_reorder(item) for item in value]
    return value


def _pretty(value: object, level: int) -> str:
    """QEMU's pretty layout: an empty container still spans two lines (``{`` then ``}``)."""
    inner = "    " * (level + 1)
    closing = "\n" + "    " * level
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_pretty(value[k], level + 1)}"
                 for k in qdict_order(value)]
        return "{\n" + ",\n".join(items) + closing + "}" if items else "{" + closing + "}"
    if isinstance(value, list | tuple):
        elems = [inner + _pretty(item, level + 1) for item in value]
        return "[\n" + ",\n".join(elems) + closing + "]" if elems else "[" + closing + "]"
    return json.dumps(value)


def dumps(value: object, pretty: bool = False) -> str:
    """One QMP message without its line ending."""
    if pretty:
        return _pretty(value, 0)
    return json.dumps(_reorder(value))


def encode_message(value: object, pretty: bool = False) -> bytes:
    """A QMP message as the monitor puts it on the wire."""
    return (dumps(value, pretty) + "\n").replace("\n", "\r\n").encode()


def event_message(name: str, data: dict[str, object] | None) -> dict[str, object]:
    """A QMP event as QEMU builds it: the time it happened, its name, its data if any."""
    now = time.time()
    seconds = int(now)
    message: dict[str, object] = {
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
        "event": name,
    }
    if data is not None:
        message["data"] = data
    return message
