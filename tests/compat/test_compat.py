"""qsd against the transcripts recorded from QEMU 11.1.3's daemon (docs/COMPATIBILITY.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat import schema
from tests.compat.compare import compare, expectation, golden_path, load_golden
from tests.compat.known import load_known, unexplained
from tests.compat.launch import ZygoteLauncher
from tests.compat.runner import run_scenario
from tests.compat.scenario import Scenario, load_scenarios

SCENARIOS = load_scenarios()
MIN_STEPS = 600


@pytest.fixture(scope="module")
def zygote() -> Iterator[ZygoteLauncher]:
    launcher = ZygoteLauncher()
    yield launcher
    launcher.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(zygote: ZygoteLauncher, scenario: Scenario) -> None:
    known = load_known()
    golden = load_golden(scenario)
    assert golden, f"no golden transcript {golden_path(scenario)}: run `make compat`"
    actual = run_scenario(zygote, scenario, expectation(scenario, golden, known))
    outcome = compare(scenario, golden, actual, known)
    assert not outcome.problems, "\n\n".join(outcome.problems)


def test_known_differences_name_existing_steps() -> None:
    keys = {(s.name, op.key) for s in SCENARIOS for op in s.steps} | {
        (s.name, "(end)") for s in SCENARIOS} | {
        (schema.SCENARIO, step.key) for step in schema.qsd_steps()}
    known = load_known()
    stale = [f"{scenario}: {key}" for group in known.groups
             for scenario, key in group.entries if (scenario, key) not in keys]
    assert not stale, "known-differences.txt names steps no scenario has:\n" + "\n".join(stale)


def test_introspection() -> None:
    """query-qmp-schema: every command and event as 11.1.3 describes it, but for the
    enum values and union branches qsd lacks and the listed differences."""
    problems = schema.problems(schema.qsd_steps(), load_known())
    assert not problems, "\n\n".join(problems)


def test_known_differences_are_explained() -> None:
    missing = unexplained(load_known())
    assert not missing, f"known differences without an owner or a reason: {missing}"


def test_docs_table_is_the_list() -> None:
    """docs/COMPATIBILITY.md's table of known differences has one row per heading."""
    doc = (Path(__file__).parents[2] / "docs" / "COMPATIBILITY.md").read_text()
    section = doc.split("## Known differences", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines()
            if line.startswith("| ") and not line.startswith(("| heading", "|---"))]
    assert sorted(rows) == sorted(group.title for group in load_known().groups)


def test_golden_transcripts_exist_for_every_scenario() -> None:
    missing = [s.name for s in SCENARIOS if not golden_path(s).exists()]
    assert not missing


def test_suite_size() -> None:
    assert sum(len(s.steps) for s in SCENARIOS) >= MIN_STEPS
