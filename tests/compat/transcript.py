"""Transcripts: what each step of a scenario produced, normalised, in a diffable text form.

::

    @ send m0 {"execute": "query-version"}
    m0: {"return": {"qemu": VERSION, "package": PACKAGE}}

A line ``@ KEY`` opens a step; each following line is ``CHANNEL: TEXT``.  Within a step,
lines are grouped by channel (channels sorted by name, ``exit`` last) and keep their
order inside a channel: the order between two sockets is not observable, the order on one
socket is.  The normalisation (docs/COMPATIBILITY.md) removes only what legitimately
varies between runs and implementations: times, the micro version and package string,
temporary paths, ports, thread ids, the random digits of automatic node names and the
program's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

EOF_MARK = "<eof>"

# Member by member, so that pretty-printed messages (one member a line) match too.
_SECONDS = re.compile(r'"seconds": \d+')
_MICROSECONDS = re.compile(r'"microseconds": \d+')
_MICRO = re.compile(r'"micro": \d+')
_PACKAGE = re.compile(r'"package": "(?:[^"\\]|\\.)*"')
_THREAD_ID = re.compile(r'"thread-id": \d+')
# QEMU names anonymous nodes "#block" + a counter + two random digits.
_AUTO_NODE_NAME = re.compile(r"#block(\d+)\d\d\b")
# The client's end of a TCP connection (query-chardev) has an ephemeral port.
_PEER_PORT = re.compile(r"( <-> [^\s\"]+:)\d+")
_VERSION_LINE = re.compile(r"^(?:qemu-storage-daemon|qsd) version (\d+\.\d+)\.\d+ \(.*\)$")
_COPYRIGHT = re.compile(r"^Copyright \(c\) 2003-\d{4} ")
# getopt's messages name the program as it was run, with its directory if it had one.
_PROGRAM = re.compile(r"(?<![\w/.-])(?:(?:/[\w.+-]+)*/)?(?:qemu-storage-daemon|qsd)(?![\w/.-])")


@dataclass
class Substitutions:
    """Run-time values put into scenario text and taken out of the output again."""

    values: dict[str, str] = field(default_factory=dict)

    def apply(self, text: str) -> str:
        for name in sorted(self.values, key=len, reverse=True):
            text = text.replace(name, self.values[name])
        return text

    def revert(self, text: str) -> str:
        for name, value in sorted(self.values.items(), key=lambda item: -len(item[1])):
            if value.isdigit():  # a port: never the digits inside a longer number
                text = re.sub(rf"(?<!\d){value}(?!\d)", name, text)
            else:
                text = text.replace(value, name)
        return text


def normalise(channel: str, text: str, subs: Substitutions) -> str:
    text = subs.revert(text)
    text = _SECONDS.sub('"seconds": S', text)
    text = _MICROSECONDS.sub('"microseconds": U', text)
    text = _MICRO.sub('"micro": MICRO', text)
    text = _PACKAGE.sub('"package": PACKAGE', text)
    text = _THREAD_ID.sub('"thread-id": TID', text)
    text = _AUTO_NODE_NAME.sub(r"#block\1RR", text)
    text = _PEER_PORT.sub(r"\1PEERPORT", text)
    if channel in ("stdout", "stderr"):
        text = _VERSION_LINE.sub(r"PROG version \1.MICRO (PACKAGE)", text)
        text = _COPYRIGHT.sub("Copyright (c) 2003-YEAR ", text)
        text = _PROGRAM.sub("PROG", text)
    return text


def _channel_order(channel: str) -> tuple[int, str]:
    return (1 if channel.endswith("exit") else 0, channel)


@dataclass
class Step:
    key: str
    lines: list[str] = field(default_factory=list)

    def add(self, channel: str, text: str) -> None:
        self.lines.append(f"{channel}: {text}")

    def sorted_lines(self) -> list[str]:
        """Lines grouped by channel; the order within a channel is kept."""
        return sorted(self.lines, key=lambda line: _channel_order(line.split(": ", 1)[0]))

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for line in self.lines:
            channel = line.split(": ", 1)[0]
            result[channel] = result.get(channel, 0) + 1
        return result


def format_steps(steps: Iterable[Step]) -> list[str]:
    out: list[str] = []
    for step in steps:
        out.append(f"@ {step.key}")
        out.extend(step.sorted_lines())
    return out


def write_transcript(path: Path, header: str, steps: list[Step]) -> None:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    path.write_text("\n".join(lines + format_steps(steps)) + "\n")


def parse_steps(lines: Iterable[str], where: str) -> list[Step]:
    steps: list[Step] = []
    for number, line in enumerate(lines, 1):
        if line.startswith("@ "):
            steps.append(Step(line[2:]))
        elif not line or line.startswith("#"):
            continue
        elif not steps or ": " not in line:
            raise ValueError(f"{where}:{number}: output line outside a step: {line!r}")
        else:
            steps[-1].lines.append(line)
    return steps


def read_transcript(path: Path) -> list[Step]:
    # Only "\n" ends a line: output may contain other characters splitlines() breaks at.
    return parse_steps(path.read_text().split("\n"), str(path))
