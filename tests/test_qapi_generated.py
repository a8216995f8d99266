"""The generated QAPI modules must match schema/*.json (run scripts/qapi-gen)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["generated.py", "introspection.py"])
def test_generated_files_are_fresh(tmp_path: Path, name: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "qapi-gen"),
                    "--output-dir", str(tmp_path)], check=True)
    fresh = (tmp_path / name).read_text()
    current = (ROOT / "qsd" / "qapi" / name).read_text()
    assert current == fresh, f"qsd/qapi/{name} is stale: run scripts/qapi-gen"


def test_generator_reports_schema_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{ 'struct': 'A', 'data': { 'b': 'Nope' } }\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "qapi-gen"),
                           "--schema-dir", str(tmp_path), "--output-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "bad.json:1: uses unknown type 'Nope'" in proc.stderr
