"""qsd's transcript against 11.1.3's golden one, step by step, with the known differences."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.compat.known import KnownDifferences
from tests.compat.scenario import Scenario
from tests.compat.transcript import Step, read_transcript

GOLDEN_DIR = Path(__file__).parent / "golden"


def golden_path(scenario: Scenario) -> Path:
    return GOLDEN_DIR / (scenario.name.removesuffix(".qmp") + ".txt")


def load_golden(scenario: Scenario) -> list[Step]:
    path = golden_path(scenario)
    return read_transcript(path) if path.exists() else []


def expectation(scenario: Scenario, golden: list[Step], known: KnownDifferences
                ) -> Callable[[str], list[str]]:
    """What qsd should say for a step: the listed difference, else 11.1.3's transcript.

    The runner reads that many lines per channel instead of waiting for silence.
    """
    by_key = {step.key: step for step in golden}

    def lines(key: str) -> list[str]:
        entry = known.find(scenario.name, key)
        if entry is not None:
            return entry[1].lines
        step = by_key.get(key)
        return step.lines if step is not None else []

    return lines


@dataclass
class Outcome:
    matched: int = 0
    known: int = 0
    problems: list[str] = field(default_factory=list)
    known_diffs: list[str] = field(default_factory=list)  # for reading, not failing


def _diff(expected: list[str], actual: list[str], label: str) -> str:
    return "\n".join(difflib.unified_diff(expected, actual, label, "qsd", lineterm="", n=2))


def compare(scenario: Scenario, golden: list[Step], actual: list[Step],
            known: KnownDifferences) -> Outcome:
    outcome = Outcome()
    by_key = {step.key: step for step in golden}
    if [s.key for s in golden if s.key != "(end)"] != [s.key for s in scenario.steps]:
        outcome.problems.append(f"{scenario.name}: the golden transcript does not match the "
                                "scenario's steps; re-record it with `make compat`")
    for step in actual:
        want = by_key.get(step.key, Step(step.key))
        got_lines = step.sorted_lines()
        want_lines = want.sorted_lines()
        entry = known.find(scenario.name, step.key)
        where = f"{scenario.name}: {step.key}"
        if got_lines == want_lines:
            outcome.matched += 1
            if entry is not None:
                outcome.problems.append(
                    f"{where}\n  now matches 11.1.3 but is listed under '{entry[0].title}' "
                    "in known-differences.txt: remove the entry")
        elif entry is not None and got_lines == entry[1].sorted_lines():
            outcome.known += 1
            outcome.known_diffs.append(f"{where}  [{entry[0].title}]\n"
                                       + _diff(want_lines, got_lines, "11.1.3"))
        elif entry is not None:
            outcome.problems.append(
                f"{where}\n  differs from both 11.1.3 and the listed known difference:\n"
                + _diff(entry[1].sorted_lines(), got_lines, "listed"))
        else:
            outcome.problems.append(f"{where}\n" + _diff(want_lines, got_lines, "11.1.3"))
    return outcome
