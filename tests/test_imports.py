"""qsd's modules import one another without a circle.

Every import statement counts, wherever it is: at the top, inside a function (the
imports deferred for start-up speed) and under ``if TYPE_CHECKING:`` (a circle there is
still two modules that each need the other to be understood). A lower layer that must
call up declares a ``typing.Protocol`` of what it needs instead of importing the layer
above. Only ``importlib`` calls with computed names (the registries' lazy loading of
drivers and command modules) are out of the walk's sight.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qsd"

# Circles inside qsd/block/ that its owners are removing: (importer, imported) pairs whose
# edges are left out of the walk until then. A pair that no longer forms a circle fails
# the test, so the list can only shrink.
KNOWN_BLOCK_CIRCLES = [
    ("qsd.block.drivers.qcow2.check", "qsd.block.drivers.qcow2.driver"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def qsd_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The qsd module ``name`` is, or is in (``qsd.x.y`` for a function ``qsd.x.y.f``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The qsd modules that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # "from package import module" imports the module; "from module import name"
            # imports the module that defines the name.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        for target in targets:
            module = _known(target, modules)
            if module is not None and module != name:
                found.add(module)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    return "\n".join(f"  {module} -> {', '.join(sorted(graph[module] & set(component)))}"
                     for module in component)


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The walk itself: top-level, deferred, TYPE_CHECKING and relative imports."""
    modules = {"qsd.a": tmp_path / "a.py", "qsd.b": tmp_path / "b.py",
               "qsd.c": tmp_path / "c.py", "qsd.p": tmp_path / "p" / "__init__.py",
               "qsd.p.d": tmp_path / "p" / "d.py"}
    modules["qsd.a"].write_text(
        "from typing import TYPE_CHECKING\nimport qsd.b\nif TYPE_CHECKING:\n"
        "    from qsd.c import Thing\ndef f():\n    from qsd.p import d\n")
    assert imports_of("qsd.a", modules["qsd.a"], modules) == {"qsd.b", "qsd.c", "qsd.p.d"}
    modules["qsd.p.d"].parent.mkdir()
    modules["qsd.p.d"].write_text("from . import e\nfrom ..c import g\nimport os\n")
    assert imports_of("qsd.p.d", modules["qsd.p.d"], modules) == {"qsd.p", "qsd.c"}
    graph = {"qsd.a": {"qsd.b"}, "qsd.b": {"qsd.c"}, "qsd.c": {"qsd.a"}, "qsd.d": set()}
    assert circles(graph) == [["qsd.a", "qsd.b", "qsd.c"]]


def test_no_import_circles() -> None:
    modules = qsd_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    for first, second in KNOWN_BLOCK_CIRCLES:
        assert second in graph[first] and first in graph[second], (
            f"{first} <-> {second} is no longer a circle: remove it from the list")
        graph[first].discard(second)
        graph[second].discard(first)
    found = circles(graph)
    assert not found, "import circles:\n" + "\n\n".join(describe(c, graph) for c in found)
