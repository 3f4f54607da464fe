"""The test tiers of tests/conftest.py, run on a small suite of their own in a pytest subprocess.

A test that calls ``subprocess`` (itself or through a tests/ helper) is marked ``slow`` and leaves the fast tier;
one that calls ``run_distributed`` is marked ``dist``; one that starts a process in a way the markers cannot see
fails at teardown, naming the command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

INNER = '''
import subprocess
import sys


def _helper():
    return subprocess.run([sys.executable, "-c", "pass"]).returncode


def run_distributed(*args):
    return []


def test_plain():
    assert 1 + 1 == 2


def test_calls_a_helper_that_starts_a_process():
    assert _helper() == 0


def test_distributed():
    assert run_distributed("x", 2) == []


def test_hides_its_process():
    assert getattr(__import__("sub" + "process"), "call")([sys.executable, "-c", "pass"]) == 0
'''


def _run(root: Path, marks: str) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-m", marks, "tests"]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300).stdout


def test_markers_follow_what_a_test_calls_and_the_fast_tier_refuses_hidden_processes(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_inner.py").write_text(INNER)

    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow\n    dist\n    slurm\n")

    fast = _run(tmp_path, "not slow and not dist and not slurm")
    assert "PASSED tests/test_inner.py::test_plain" in fast, fast
    assert "ERROR at teardown of test_hides_its_process" in fast, fast
    assert (f"tests/test_inner.py::test_hides_its_process is in the fast tier but started subprocess "
            f"{sys.executable} -c pass: mark it @pytest.mark.slow") in fast, fast
    assert "2 passed, 2 deselected, 1 error" in fast, fast

    slow = _run(tmp_path, "slow")
    assert "PASSED tests/test_inner.py::test_calls_a_helper_that_starts_a_process" in slow, slow
    assert "1 passed, 3 deselected" in slow, slow
    dist = _run(tmp_path, "dist")
    assert "PASSED tests/test_inner.py::test_distributed" in dist and "1 passed, 3 deselected" in dist, dist
