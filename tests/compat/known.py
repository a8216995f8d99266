"""The list of known differences: steps where qsd answers otherwise than 11.1.3, and why.

``tests/compat/known-differences.txt`` groups entries under a heading with an owner and a
reason; each entry names a step and holds qsd's output for it, so the check is exact on
both sides: an entry whose step now matches 11.1.3 fails (remove it), and so does a step
whose output is neither 11.1.3's nor the listed one.

::

    ## quit sends a SHUTDOWN event
    owner: compat
    reason: ...
    @ quit.qmp: send m0 {"execute": "quit"}
    m0: {"return": {}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tests.compat.transcript import Step, format_steps

KNOWN_PATH = Path(__file__).parent / "known-differences.txt"


@dataclass
class Group:
    title: str
    owner: str = ""
    reason: str = ""
    entries: dict[tuple[str, str], Step] = field(default_factory=dict)


@dataclass
class KnownDifferences:
    groups: list[Group] = field(default_factory=list)

    def find(self, scenario: str, key: str) -> tuple[Group, Step] | None:
        for group in self.groups:
            step = group.entries.get((scenario, key))
            if step is not None:
                return group, step
        return None

    def write(self, path: Path = KNOWN_PATH) -> None:
        out = [line for line in HEADER.splitlines()]
        for group in self.groups:
            out += ["", f"## {group.title}", f"owner: {group.owner}", f"reason: {group.reason}"]
            for (scenario, key), step in group.entries.items():
                lines = format_steps([Step(key, step.lines)])
                out += [f"@ {scenario}: {lines[0][2:]}", *lines[1:]]
        path.write_text("\n".join(out) + "\n")


HEADER = """\
# Steps where qsd differs from QEMU 11.1.3's qemu-storage-daemon, and why.
# Format and rules: tests/compat/known.py and docs/COMPATIBILITY.md.  The output lines under
# each "@ SCENARIO: STEP" are qsd's; `scripts/compat update-known` refreshes them."""


def parse_known(text: str, where: str = str(KNOWN_PATH)) -> KnownDifferences:
    known = KnownDifferences()
    step: Step | None = None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip() or line.startswith("# ") or line == "#":
            continue
        if line.startswith("## "):
            known.groups.append(Group(line[3:].strip()))
            step = None
            continue
        if not known.groups:
            raise ValueError(f"{where}:{number}: entry before the first '## ' heading")
        group = known.groups[-1]
        if line.startswith("owner: "):
            group.owner = line[7:].strip()
        elif line.startswith("reason: "):
            group.reason = line[8:].strip()
        elif line.startswith("@ "):
            scenario, sep, key = line[2:].partition(": ")
            if not sep:
                raise ValueError(f"{where}:{number}: expected '@ SCENARIO: STEP'")
            if known.find(scenario, key) is not None:
                raise ValueError(f"{where}:{number}: {scenario}: {key!r} is listed twice")
            step = Step(key)
            group.entries[(scenario, key)] = step
        elif step is not None and ": " in line:
            step.lines.append(line)
        else:
            raise ValueError(f"{where}:{number}: cannot parse {line!r}")
    return known


def unexplained(known: KnownDifferences) -> list[str]:
    """Headings still without an owner or a reason (``update-known`` leaves "TODO")."""
    return [group.title for group in known.groups
            if not group.owner or not group.reason or group.reason.upper().startswith("TODO")]


def load_known(path: Path = KNOWN_PATH) -> KnownDifferences:
    return parse_known(path.read_text() if path.exists() else "", str(path))
