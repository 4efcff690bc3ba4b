"""The suite's own rules hold: under CI a skip is a failure (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(("ci", "expected"), [("1", "1 failed"), ("", "1 skipped")])
def test_a_skip_fails_under_ci_only(tmp_path: Path, ci: str, expected: str) -> None:
    shutil.copy(HERE.parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_tool.py").write_text(
        "import pytest\n\ndef test_needs_a_tool():\n    pytest.skip('kubectl is not installed')\n",
        encoding="utf-8",
    )
    env = {**os.environ, "GRADMIX_CI": ci}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert expected in run.stdout, run.stdout
