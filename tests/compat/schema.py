"""query-qmp-schema compared by shape with QEMU 11.1.3's (docs/COMPATIBILITY.md).

Introspection names most types by numbers, and the numbers differ between the two
programs, so each command's arguments and return type and each event's data are compared
as the structures the names stand for: members with their types, optionality and
features, union tags and branches, array elements, alternate branches, JSON types of
built-in types.  Enum values and union branches that qsd lacks are no difference (qsd has
fewer drivers, backends and object types; the docs say which); all else is.

Differences are listed in known-differences.txt like a scenario's steps: the scenario is
``query-qmp-schema``, the step the command or event, each line ``schema: DIFFERENCE``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.compat.known import KnownDifferences
from tests.compat.transcript import Step

SCENARIO = "query-qmp-schema"
GOLDEN = Path(__file__).parent / "golden" / "query-qmp-schema.json"

Entity = dict[str, object]


def load_reference() -> list[Entity]:
    entities: list[Entity] = json.loads(GOLDEN.read_text())
    return entities


def query_schema(command: list[str]) -> list[Entity]:
    """query-qmp-schema's reply from the daemon ``command`` runs, over a stdio monitor."""
    requests = (b'{"execute": "qmp_capabilities"}\n{"execute": "query-qmp-schema"}\n'
                b'{"execute": "quit"}\n')
    done = subprocess.run(command + ["--chardev", "stdio,id=m0", "--monitor", "m0"],
                          input=requests, capture_output=True, timeout=120, check=True)
    reply = json.loads(done.stdout.splitlines()[2])
    entities: list[Entity] = reply["return"]
    return entities


def golden_text(entities: list[Entity]) -> str:
    """The golden file: one entity a line, so that a re-recording diffs readably."""
    return "[\n" + ",\n".join(json.dumps(e, sort_keys=True) for e in entities) + "\n]\n"


class _Comparison:
    def __init__(self, reference: list[Entity], ours: list[Entity]) -> None:
        self.ref = {str(e["name"]): e for e in reference}
        self.ours = {str(e["name"]): e for e in ours}
        self.out: list[str] = []
        self.current = ""
        self.lacking: dict[str, list[str]] = {}

    def entity(self, name: str) -> list[str]:
        self.out = []
        self.current = name
        ours = self.ours[name]
        ref = self.ref.get(name)
        if ref is None or ref["meta-type"] != ours["meta-type"]:
            return [f"{name}: not a {ours['meta-type']} in 11.1.3"]
        roles = (("arguments", "arg-type"), ("returns", "ret-type"))
        if ours["meta-type"] == "event":
            roles = (("data", "arg-type"),)
        for role, key in roles:
            self.type(role, str(ref[key]), str(ours[key]), frozenset())
        for key in ("allow-oob", "features"):
            if ref.get(key) != ours.get(key):
                self.out.append(f"{key}: {ref.get(key)} in 11.1.3, {ours.get(key)} in qsd")
        return self.out

    def type(self, path: str, a: str, b: str, seen: frozenset[tuple[str, str]]) -> None:
        if (a, b) in seen:  # a recursive type, compared further up this path
            return
        seen |= {(a, b)}
        ta, tb = self.ref[a], self.ours[b]
        meta = ta["meta-type"]
        if meta != tb["meta-type"]:
            self.out.append(f"{path}: {_kind(ta)} in 11.1.3, {_kind(tb)} in qsd")
        elif meta == "builtin":
            if ta["json-type"] != tb["json-type"]:
                self.out.append(f"{path}: {_kind(ta)} in 11.1.3, {_kind(tb)} in qsd")
        elif meta == "enum":
            values = _strings(ta["values"])
            extra = [v for v in _strings(tb["values"]) if v not in values]
            if extra:
                self.out.append(f"{path}: values 11.1.3 lacks: {', '.join(extra)}")
            ours = _strings(tb["values"])
            self.lacking[f"{self.current} {path}"] = [v for v in values if v not in ours]
        elif meta == "array":
            self.type(f"{path}[]", str(ta["element-type"]), str(tb["element-type"]), seen)
        elif meta == "alternate":
            self.alternate(path, ta, tb, seen)
        elif meta == "object":
            self.object(path, ta, tb, seen)

    def alternate(self, path: str, ta: Entity, tb: Entity,
                  seen: frozenset[tuple[str, str]]) -> None:
        branches = {self._branch_kind(str(m["type"]), self.ref): str(m["type"])
                    for m in _members(ta)}
        ours = {self._branch_kind(str(m["type"]), self.ours): str(m["type"])
                for m in _members(tb)}
        for kind in sorted(branches.keys() | ours.keys()):
            if kind not in ours:
                self.out.append(f"{path}: branch {kind} missing in qsd")
            elif kind not in branches:
                self.out.append(f"{path}: branch {kind} not in 11.1.3")
            else:
                self.type(f"{path}<{kind}>", branches[kind], ours[kind], seen)

    @staticmethod
    def _branch_kind(name: str, types: dict[str, Entity]) -> str:
        entity = types[name]
        return str(entity["json-type"] if entity["meta-type"] == "builtin"
                   else entity["meta-type"])

    def object(self, path: str, ta: Entity, tb: Entity,
               seen: frozenset[tuple[str, str]]) -> None:
        members = {str(m["name"]): m for m in _members(ta)}
        ours = {str(m["name"]): m for m in _members(tb)}
        for name in sorted(members.keys() | ours.keys()):
            where = f"{path}.{name}"
            if name not in ours:
                self.out.append(f"{where}: missing in qsd")
            elif name not in members:
                self.out.append(f"{where}: not in 11.1.3")
            else:
                a, b = members[name], ours[name]
                if ("default" in a) != ("default" in b):
                    self.out.append(f"{where}: optional in {'11.1.3' if 'default' in a else 'qsd'}"
                                    " only")
                if a.get("features") != b.get("features"):
                    self.out.append(f"{where}: features {a.get('features')} in 11.1.3, "
                                    f"{b.get('features')} in qsd")
                self.type(where, str(a["type"]), str(b["type"]), seen)
        if ta.get("tag") != tb.get("tag"):
            self.out.append(f"{path}: tag {ta.get('tag')} in 11.1.3, {tb.get('tag')} in qsd")
        variants = {str(v["case"]): str(v["type"]) for v in _members(ta, "variants")}
        ours_v = {str(v["case"]): str(v["type"]) for v in _members(tb, "variants")}
        for case in sorted(ours_v):
            if case not in variants:
                self.out.append(f"{path}[{case}]: branch not in 11.1.3")
            else:
                self.type(f"{path}[{case}]", variants[case], ours_v[case], seen)


def _members(entity: Entity, key: str = "members") -> list[dict[str, object]]:
    value = entity.get(key, [])
    assert isinstance(value, list)
    return value


def _strings(values: object) -> list[str]:
    assert isinstance(values, list)
    return [str(v) for v in values]


def _kind(entity: Entity) -> str:
    if entity["meta-type"] == "builtin":
        return f"JSON {entity['json-type']}"
    return str(entity["meta-type"])


def schema_steps(reference: list[Entity], ours: list[Entity]) -> list[Step]:
    """One step per command and event qsd has, holding its differences (none: empty)."""
    comparison = _Comparison(reference, ours)
    steps = []
    for entity in ours:
        if entity["meta-type"] in ("command", "event"):
            name = str(entity["name"])
            steps.append(Step(name, [f"schema: {d}" for d in comparison.entity(name)]))
    return steps


def lacking_values(reference: list[Entity], ours: list[Entity]) -> dict[str, list[str]]:
    """Per enum on the commands' and events' paths, the values qsd does not have."""
    comparison = _Comparison(reference, ours)
    for entity in ours:
        if entity["meta-type"] in ("command", "event"):
            comparison.entity(str(entity["name"]))
    return {path: values for path, values in comparison.lacking.items() if values}


def qsd_steps() -> list[Step]:
    """qsd's differences from the recorded introspection, a step per command and event."""
    from qsd.qapi import schema_introspection

    return schema_steps(load_reference(), schema_introspection())


def problems(steps: list[Step], known: KnownDifferences) -> list[str]:
    """What known-differences.txt does not say as it is, each with the lines to list."""
    out = []
    names = {step.key for step in steps}
    for step in steps:
        entry = known.find(SCENARIO, step.key)
        listed = entry[1].lines if entry is not None else []
        if step.lines != listed:
            out.append(f"{SCENARIO}: {step.key}: qsd's introspection differs from 11.1.3's "
                       "otherwise than listed; list it as\n"
                       + "\n".join([f"@ {SCENARIO}: {step.key}", *step.lines]))
    for group in known.groups:
        for scenario, key in group.entries:
            if scenario == SCENARIO and key not in names:
                out.append(f"{SCENARIO}: {key} is listed but qsd has no such command or event")
    return out
