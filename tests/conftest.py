"""Suite-wide rules and layout.

`tests/unit` holds tests of one component in process (no server, no
subprocess, seconds in all: `make test-fast`); `tests/integration` the ones
that run real servers, trainers, torchrun, S3 endpoints, Prometheus and the
benches. Helpers they share live in `tests/support` (never collected: their
names do not start with `test_`), which is put on the import path here.

Under CI (`GRADMIX_CI=1`, set by `.ci/run`) a skipped test fails: the
deploy tests skip when kubectl, promtool or prometheus are missing, and a
green CI run must mean they ran. Locally they still skip, naming the tool and
`scripts/install_system_deps.sh`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

CI = os.environ.get("GRADMIX_CI", "") not in ("", "0")

# DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op at the first
# `deepspeed.initialize`; every trainer this suite starts (in process or as a
# subprocess, which inherits this) shares one build per environment, not the
# user-wide cache another checkout's build could hold the lock of.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (GRADMIX_CI=1), which must run every test: {reason}"
