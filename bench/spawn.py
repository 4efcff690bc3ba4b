"""Starting a gradmix server as a child process for a bench, on free loopback ports."""

from __future__ import annotations

import re
import subprocess

#: The server's start-up line: "... grpc=<host>:<port> metrics=<host>:<port> ...".
LINE = re.compile(r"grpc=(\S+):(\d+) ")


def spawn_server(command: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Run `command` (a server command line with `--port 0`) until it prints its
    start-up line: the process and its gRPC address on loopback. Exits naming the
    line it printed instead when it did not start."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = LINE.search(line)
    if not match:
        process.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return process, f"127.0.0.1:{match.group(2)}"
