"""Benchmark of training through a server outage: steps/s with the server up, during
an outage, and after it comes back.

Runs the example job (`examples/arith`: a 2-layer GPT-2, character arithmetic, CPU,
one rank, `OMP_NUM_THREADS=1`) against a real server on loopback, with a sketch point
every 20 steps. Once the job's first estimated mixture is in force and a further
`--window` seconds of warm-up have passed, it measures `--window` seconds with the
server up, then stops the server for `--window` seconds,
then starts it again on the same port and store and measures `--window` seconds more.
Steps/s are counted from the trainer's own `step` events (their wall-clock times).

    python bench/outage.py [--window 12]

Last line: ``outage: up_steps_s=<...> down_steps_s=<...> back_steps_s=<...>
down_ratio=<...>`` (down_ratio = down / up from the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gradmix.server.app import RunningServer, build_server
from gradmix.server.config import ServerConfig
from gradmix.trainer.runlog import log_path, read_log
from prometheus_client import CollectorRegistry

DATA = Path(__file__).resolve().parent.parent / "examples" / "arith" / "data"


def _config(root: Path, port: int, store: Path) -> Path:
    tasks = ", ".join(f'{t} = "{DATA / t}.jsonl"' for t in ("add", "mul", "rev"))
    text = f"""
job = "outage"
output_dir = "{root / 'out'}"
server = "127.0.0.1:{port}"
store = "{store}"
[model]
[model.config]
model_type = "gpt2"
n_embd = 32
n_layer = 2
n_head = 2
n_positions = 32
[tokenizer]
kind = "char"
alphabet = "0123456789+*=rev "
[data]
target = "{DATA / 'target.jsonl'}"
tasks = {{ {tasks} }}
max_length = 24
[deepspeed]
zero_optimization = {{ stage = 0 }}
[training]
steps = 1000000
lr = 3e-3
batch_size = 8
eval_every = 0
[sketching]
dim = 64
examples_per_task = 8
interval = 20
reanchor_every = 1000000
"""
    path = root / "job.toml"
    path.write_text(text)
    return path


def _events(out: Path, event: str) -> list[dict]:
    path = log_path(out, 0)
    return [e for e in read_log(path) if e["event"] == event] if path.exists() else []


def _rate(out: Path, start: float, end: float) -> float:
    steps = [e for e in _events(out, "step") if start <= e["time"] < end]
    return len(steps) / (end - start)


def _wait(check: Callable[[], object], proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what} (trainer exit code {proc.poll()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=12.0, help="seconds per phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = root / "store"

        def start(port: int) -> tuple[RunningServer, int]:
            config = ServerConfig(store=str(store), port=port, metrics_port=0,
                                  debounce_seconds=0.1, insecure=True, log_level="WARNING")
            return build_server(config, registry=CollectorRegistry())

        server, port = start(0)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradmix.trainer.main", "--config",
             str(_config(root, port, store))],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        out = root / "out"
        again = None
        try:
            _wait(lambda: any(e["anchor"] for e in _events(out, "mixture")), proc, 300,
                  "the first estimated mixture")
            time.sleep(args.window)  # warm-up, not measured
            t0 = time.time()
            time.sleep(args.window)
            t1 = time.time()
            server.stop(grace=0)
            time.sleep(args.window)
            t2 = time.time()
            again, _ = start(port)
            time.sleep(args.window)
            t3 = time.time()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            if again is not None:
                again.stop(grace=0)
        up, down, back = _rate(out, t0, t1), _rate(out, t1, t2), _rate(out, t2, t3)
        server_lines = [e["message"] for e in _events(out, "server")]
        print(json.dumps({"server_events": server_lines}))
        print(f"load average {os.getloadavg()[0]:.1f}")
        print(f"outage: up_steps_s={up:.1f} down_steps_s={down:.1f} back_steps_s={back:.1f} "
              f"down_ratio={down / up if up else float('nan'):.2f}")


if __name__ == "__main__":
    main()
