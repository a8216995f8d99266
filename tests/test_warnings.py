"""The DeprecationWarning rule really applies to qsd's code, and only to it."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from tests.harness import QSD_DEPRECATIONS_FATAL

PROBE_SOURCE = "import warnings\nwarnings.warn('old API', DeprecationWarning)"


def test_in_process_rule_covers_qsd_modules() -> None:
    probe = compile(PROBE_SOURCE, "<probe>", "exec")
    with pytest.raises(DeprecationWarning, match="old API"):
        exec(probe, {"__name__": "qsd.block.probe"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        exec(probe, {"__name__": "qsdlike"})
    assert [w.category for w in caught] == [DeprecationWarning]


@pytest.mark.parametrize(("module", "fatal"), [
    ("qsd", True), ("qsd.export.fuse.queue", True), ("__main__", True),
    ("qsdlike", False), ("pydantic.main", False),
])
def test_daemon_rule_covers_qsd_modules(module: str, fatal: bool) -> None:
    """The filter the harness installs in every daemon it starts."""
    run_probe = f"exec(compile({PROBE_SOURCE!r}, '<probe>', 'exec'), {{'__name__': {module!r}}})"
    # -W makes every other DeprecationWarning visible, so each case shows on stderr.
    proc = subprocess.run([sys.executable, "-W", "default::DeprecationWarning", "-c",
                           f"{QSD_DEPRECATIONS_FATAL}\n{run_probe}"],
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode != 0) == fatal, proc.stderr
    assert "DeprecationWarning" in proc.stderr
