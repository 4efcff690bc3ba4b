"""The README's "Using it for real" runs as written, so the document cannot rot.

The section's fenced shell blocks are run in order from a copy of the
repository's `examples/` folder: the `gradmix-server` line starts the real
server (with its ports set to 0, so a free one is picked and read from its
start-up line), `pip install` lines are skipped (the test runs in the
installed environment), and every other line runs in one bash script with
`set -e` (GRADMIX_SERVER points at the server). Then the section's Python
block runs. Every command must succeed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def section(text: str, title: str) -> str:
    """The README section under `## title`, up to the next `## ` heading."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 3)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of one language, in order."""
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _server_command(line: str) -> list[str]:
    """The README's server line, in the foreground, with ports 0 (free ones)."""
    words = shlex.split(line.rstrip("& \t"))
    for flag in ("--port", "--metrics-port"):
        words[words.index(flag) + 1] = "0"
    return [str(BIN / words[0]), *words[1:]]


def test_the_using_it_for_real_section_parses() -> None:
    text = section((ROOT / "README.md").read_text(), "Using it for real")
    shell = blocks(text, "bash")
    assert len(shell) == 3 and len(blocks(text, "python")) == 1
    servers = [line for block in shell for line in block.splitlines()
               if line.startswith("gradmix-server ")]
    assert len(servers) == 1
    assert "uri=" not in text, "the trainer reads path= metadata"
    for path in re.findall(r"examples/[\w/.-]+", text):
        assert (ROOT / path.rstrip(".")).exists(), path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readme_commands_run_as_written(tmp_path: Path) -> None:
    text = section((ROOT / "README.md").read_text(), "Using it for real")
    shutil.copytree(ROOT / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("runs", "gradmix-store"))
    lines = [line for block in blocks(text, "bash") for line in block.splitlines()]
    server_line = next(line for line in lines if line.startswith("gradmix-server "))
    script = [line for line in lines
              if line.strip() and not line.startswith(("#", "pip install", "gradmix-server "))]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(_server_command(server_line), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        started = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not started:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            started = line if "listening grpc=" in line else ""
        match = re.search(r"grpc=(\S+)", started)
        assert match, f"no start-up line (server exit code {server.poll()})"
        env["GRADMIX_SERVER"] = match.group(1)
        assert (tmp_path / "gradmix-store").is_dir()

        done = subprocess.run(["bash", "-e", "-x", "-c", "\n".join(script)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=500)
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        assert "never produced an estimated mixture" not in done.stderr
        assert "run summary: 40 steps" in done.stderr

        (snippet,) = blocks(text, "python")
        ran = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert ran.stdout.startswith("version ")
    finally:
        server.terminate()
        server.wait(timeout=30)
