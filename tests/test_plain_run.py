"""A pytest run that audits nothing stays free: the plugin loads in every pytest run of every
project where it is installed, so its hooks must not import torch (2-5 s per run) or numpy."""

import re
import subprocess
import sys


def imported_modules(importtime_log: str) -> set[str]:
    """The module names ``python -X importtime`` reports (one per line: ``... | <indent>name``)."""
    return {match.group(1) for match in re.finditer(r"\|\s+([\w.]+)\s*$", importtime_log, re.MULTILINE)}


def test_a_run_without_an_audit_imports_neither_torch_nor_numpy(pytester):
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=pytester.path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    modules = imported_modules(done.stderr)
    # The plugin did load (else this test proves nothing). pytest's assertion-rewriting loader hides the
    # plugin module itself from -X importtime; the module it imports first shows.
    assert "pytest_memaudit.plugin.parallel" in modules
    assert not {"torch", "numpy", "scipy"} & modules, sorted(m for m in modules if m.split(".")[0] in
                                                             ("torch", "numpy", "scipy"))
