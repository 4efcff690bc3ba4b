"""Benchmark: the server's memory as rows are uploaded.

Run by hand: ``.venv/bin/python bench/memory.py`` (defaults: 20 tasks, d = 256,
64 MB of task rows in 8 rounds over UploadSketch, the default policy).

It starts ``gradmix-server`` as a subprocess on a fresh store, twice in one run:

* ``lean``: the server as it is, which keeps per-task statistics and reads
  task rows back from the store when the exact mode or the bootstrap needs
  them;
* ``kept``: the same server with task rows kept in memory after ingest (the
  behaviour before rows were read back), by a wrapper that gives each
  anchor's estimator no row reader.

Each run sketches the target and a few rows per task at a complete anchor,
waits for the first re-estimate and reads the server's resident memory
(VmRSS); then it uploads the task rows (float32 gradients and float64 values:
``rows × (4·d + 8)`` bytes count as uploaded), waits until every row is
ingested and re-estimated (VmRSS after each round), runs one exact
EstimateSubsets (which reads rows back) and reads VmRSS again.

The last line is::

    memory: uploaded_mb=<...> lean_growth_mb=<...> kept_growth_mb=<...> \
        lean_slope_mb_per_mb=<...> kept_slope_mb_per_mb=<...> ratio=<...>

(one line; broken here only for width). Growth: VmRSS at the end minus
before the uploads; slope: the least-squares slope of VmRSS over the rounds,
MB per MB uploaded (what grows with the rows; the first round's jump is the
re-estimate's working memory, which does not); ratio: lean / kept growth.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server.rows import encode_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spawn import spawn_server

JOB = "bench"
ANCHOR = "a0"
#: Rows per UploadSketch message.
CHUNK = 2000
#: Waits are bounded by this many seconds.
WAIT_S = 600.0

#: Runs the server with task rows kept in memory: each anchor's estimator gets no reader.
KEPT = """
import sys
import gradmix.server.jobstate as jobstate
from gradmix.server.app import main
lean = jobstate.JobState._anchor_rows
def kept(self, anchor):
    rows = lean(self, anchor)
    rows.estimator.rows = None
    return rows
jobstate.JobState._anchor_rows = kept
sys.exit(main(sys.argv[1:]))
"""


def start_server(store_dir: Path, kept: bool) -> tuple[subprocess.Popen[str], str]:
    prefix = ["-c", KEPT] if kept else ["-m", "gradmix.server.app"]
    return spawn_server([sys.executable, *prefix, "--store", str(store_dir), "--port", "0",
                         "--metrics-port", "0", "--log-level", "WARNING", "--insecure"])


def rss_mb(pid: int) -> float:
    """The process's resident memory (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def upload(stub: pb_grpc.SelectionServiceStub, task: str | None, grads: np.ndarray,
           values: np.ndarray, first_id: int, writer: str) -> None:
    source = (pb.SketchSource(job=JOB, anchor=ANCHOR, target=True) if task is None
              else pb.SketchSource(job=JOB, anchor=ANCHOR, task=task))

    def requests():
        yield pb.UploadSketchRequest(header=pb.UploadSketchHeader(source=source, writer=writer))
        for lo in range(0, len(values), CHUNK):
            ids = np.arange(first_id + lo, first_id + min(lo + CHUNK, len(values)))
            yield pb.UploadSketchRequest(rows=encode_rows(grads[lo:lo + CHUNK],
                                                          values[lo:lo + CHUNK], ids))

    stub.UploadSketch(requests())


def wait_rows(stub: pb_grpc.SelectionServiceStub, rows: int) -> None:
    """Until every task shows `rows` ingested rows and no re-estimate is pending."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        tasks = stub.ListTasks(pb.ListTasksRequest(job=JOB, page_size=1000)).tasks
        if all(t.sketch_rows == rows for t in tasks):
            return
        time.sleep(0.2)
    raise SystemExit(f"rows not ingested within {WAIT_S:.0f} s")


def run(kept: bool, args: argparse.Namespace) -> tuple[float, float, float]:
    """(RSS growth in MB, its least-squares slope over the rounds in MB per MB uploaded,
    MB uploaded) of one server."""
    rng = np.random.default_rng(0)
    tasks = [f"task-{i:03d}" for i in range(args.tasks)]
    row_bytes = 4 * args.dim + 8
    rounds_rows = int(args.mb * 2**20 / row_bytes / args.tasks / args.rounds)
    with tempfile.TemporaryDirectory() as work:
        process, address = start_server(Path(work) / "store", kept)
        channel = grpc.insecure_channel(address)
        try:
            stub = pb_grpc.SelectionServiceStub(channel)
            stub.CreateJob(pb.CreateJobRequest(name=JOB, spec=pb.JobSpec(
                sketch=pb.SketchSpec(dim=args.dim, seed=0, dtype=pb.SKETCH_DTYPE_FLOAT32))))
            for task in tasks:
                stub.RegisterTask(pb.RegisterTaskRequest(job=JOB, name=task))
            stub.DeclareAnchor(pb.DeclareAnchorRequest(job=JOB, anchor=ANCHOR, step=1))
            direction = rng.normal(size=args.dim) / np.sqrt(args.dim)

            def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
                grads = rng.normal(size=(n, args.dim)).astype(np.float32)
                return grads, 0.5 + grads @ direction + 0.1 * rng.normal(size=n)

            upload(stub, None, *rows(args.target_rows), 0, "bench")
            first = 16
            for task in tasks:
                upload(stub, task, *rows(first), 0, "bench")
            stub.CompleteAnchor(pb.CompleteAnchorRequest(job=JOB, anchor=ANCHOR))
            wait_rows(stub, first)
            before = rss_mb(process.pid)
            uploaded, trace = 0, []
            for r in range(args.rounds):
                for task in tasks:
                    upload(stub, task, *rows(rounds_rows), first + r * rounds_rows, "bench")
                    uploaded += rounds_rows * row_bytes
                wait_rows(stub, first + (r + 1) * rounds_rows)
                trace.append((uploaded / 2**20, rss_mb(process.pid)))
                print(f"  round {r}: uploaded {trace[-1][0]:.1f} MB, rss={trace[-1][1]:.1f} MB",
                      flush=True)
            stub.EstimateSubsets(pb.EstimateSubsetsRequest(
                job=JOB, mode=pb.ESTIMATE_MODE_EXACT,
                subsets=[pb.Subset(tasks=tasks[:2]), pb.Subset(tasks=tasks[2:4])]),
                timeout=WAIT_S)
            after = rss_mb(process.pid)
        finally:
            channel.close()
            process.terminate()
            process.wait(30)
    label = "kept" if kept else "lean"
    print(f"{label}: rss before={before:.1f} MB after={after:.1f} MB, "
          f"uploaded {uploaded / 2**20:.1f} MB", flush=True)
    mb, rss = np.array(trace).T
    slope = float(np.polyfit(mb, rss, 1)[0]) if len(trace) > 1 else float("nan")
    return after - before, slope, uploaded / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--mb", type=float, default=64.0, help="MB of task rows to upload")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--target-rows", type=int, default=512)
    args = parser.parse_args(argv)
    lean, lean_slope, uploaded = run(False, args)
    kept, kept_slope, _ = run(True, args)
    print(f"memory: uploaded_mb={uploaded:.1f} lean_growth_mb={lean:.1f} "
          f"kept_growth_mb={kept:.1f} lean_slope_mb_per_mb={lean_slope:.3f} "
          f"kept_slope_mb_per_mb={kept_slope:.3f} ratio={lean / kept:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
