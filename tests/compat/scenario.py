"""Scenario files: what the differential suite sends to a daemon, one operation a line.

A scenario is a script of operations against one daemon at a time.  Every operation that
talks to the daemon is a *step*; the suite records what each step produces on every
channel (monitor connections, NBD clients, the daemon's stdout/stderr, its exit status)
and compares those lines between QEMU's daemon and qsd.  The language is described in
docs/COMPATIBILITY.md; ``$TMP`` and ``$PORT1``..``$PORT9`` are replaced before use.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SCENARIO_DIR = Path(__file__).parent / "scenarios"

# Operations that prepare files and are not steps (they produce no output to compare).
SETUP_OPS = {"file", "mkdir"}
STEP_OPS = {
    "daemon", "run", "connect", "stdio", "send", "raw", "expr", "close", "shutdown-write",
    "nbd", "signal", "wait-exit", "wait",
}


class ScenarioError(ValueError):
    """A malformed scenario line."""


@dataclass(frozen=True)
class Op:
    """One line of a scenario: ``name`` and the rest of the line, unparsed."""

    name: str
    rest: str
    line: int
    key: str  # the step's identity: its text, with "#n" for the n-th repetition

    @property
    def text(self) -> str:
        return f"{self.name} {self.rest}".rstrip()

    @property
    def is_step(self) -> bool:
        return self.name in STEP_OPS

    def channel_and_payload(self) -> tuple[str, str]:
        """For ``send NAME TEXT``-like operations: the channel and the verbatim rest."""
        name, _, payload = self.rest.partition(" ")
        if not name:
            raise ScenarioError(f"line {self.line}: {self.name} needs a channel name")
        return name, payload


@dataclass(frozen=True)
class Scenario:
    name: str
    ops: list[Op]

    @property
    def steps(self) -> list[Op]:
        return [op for op in self.ops if op.is_step]


def parse_scenario(name: str, text: str) -> Scenario:
    ops: list[Op] = []
    seen: Counter[str] = Counter()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        op_name, _, rest = line.lstrip().partition(" ")
        if op_name not in STEP_OPS and op_name not in SETUP_OPS:
            raise ScenarioError(f"{name}:{number}: unknown operation {op_name!r}")
        text_key = f"{op_name} {rest}".rstrip()
        seen[text_key] += 1
        key = text_key if seen[text_key] == 1 else f"{text_key} #{seen[text_key]}"
        ops.append(Op(op_name, rest, number, key))
    return Scenario(name, ops)


def load_scenarios(directory: Path = SCENARIO_DIR) -> list[Scenario]:
    return [parse_scenario(path.name, path.read_text())
            for path in sorted(directory.glob("*.qmp"))]
