"""JSON output exactly as QEMU writes it (``qobject/json-writer.c``).

QEMU stores objects in a QDict, a 512-bucket hash table keyed by ``tdb_hash`` whose buckets
are walked in order, newest entry first within a bucket.  Clients and regression scripts
that compare raw output see that order, so qsd reproduces it instead of Python's insertion
order.  Separators are QEMU's (``", "`` and ``": "``).  The monitor turns every ``\\n``
into ``\\r\\n`` on the way out, so each message ends in CRLF, pretty ones on every line.

Scalars are printed as QEMU prints them: integers in full, floating-point numbers with
``%.17g`` (``0.10000000000000001``, ``1``, ``-0``, ``inf``, ``1e+22``), strings with
``\\uXXXX`` (upper-case hex) for everything outside printable ASCII, a surrogate pair
beyond the BMP and U+FFFD for what is not a character (a lone surrogate).
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Iterable
from typing import Any

_BUCKETS = 512
_MASK = 0xFFFFFFFF

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# In json.dumps' ASCII output every backslash starts an escape, so matching escapes from
# left to right never mistakes an escaped backslash followed by "u" for a \u escape.
_ESCAPE = re.compile(r"\\(?:u([0-9a-f]{4})|.)")
_PLAIN = re.compile(r'[ !#-\[\]-~]*\Z')


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


def _upper_escape(match: re.Match[str]) -> str:
    return "\\u" + match.group(1).upper() if match.group(1) else match.group()


def quote(text: str) -> str:
    """A string as QEMU's quoted_str() writes it."""
    if _PLAIN.match(text):
        return f'"{text}"'
    text = _LONE_SURROGATE.sub("\ufffd", text)
    return _ESCAPE.sub(_upper_escape, json.dumps(text)).replace("\x7f", "\\u007F")


def scalar(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.17g}"
    raise TypeError(f"cannot encode {type(value).__name__} as QMP JSON")


def _members(value: object) -> list[tuple[str | None, object]] | None:
    """A container's members as (key or None, value) in output order; None for scalars."""
    if isinstance(value, dict):
        return [(key, value[key]) for key in qdict_order(value)]
    if isinstance(value, list | tuple):
        return [(None, item) for item in value]
    return None


def dumps(value: object, pretty: bool = False) -> str:
    """One QMP message without its line ending.

    Iterative, because input may nest 1024 deep (QEMU's limit) and an ``id`` is echoed
    as it came.  Pretty output puts each member on a line of its own, and even an empty
    container spans two (``{`` then ``}``).
    """
    out: list[str] = []
    # Open containers: [closing bracket, members left (reversed), depth, nothing written]
    stack: list[list[Any]] = []
    pending = value
    while True:
        members = _members(pending)
        if members is None:
            out.append(scalar(pending))
        else:
            is_dict = isinstance(pending, dict)
            out.append("{" if is_dict else "[")
            stack.append(["}" if is_dict else "]", members[::-1], len(stack), True])
        while stack:
            frame = stack[-1]
            closing, todo, depth, first = frame
            if todo:
                frame[3] = False
                if not first:
                    out.append(",")
                if pretty:
                    out.append("\n" + "    " * (depth + 1))
                elif not first:
                    out.append(" ")
                key, pending = todo.pop()
                if key is not None:
                    out.append(quote(key) + ": ")
                break
            stack.pop()
            if pretty:
                out.append("\n" + "    " * depth)
            out.append(closing)
        else:
            return "".join(out)


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
