"""Benchmark: the selection server on loopback, as trainers and data loaders use it.

Run by hand: ``.venv/bin/python bench/server.py`` (defaults: 100 tasks, d = 256,
64 rows per task, the server's default config and policy).

It starts ``gradmix-server`` as a subprocess on a fresh store and measures, in
one run:

* commit → push: rows appended to the store for one task, then CommitSketch;
  the time until a watcher holds the version that commit produced (p50, p99
  over ``--commits`` commits). Baseline in the same run: the re-estimate alone
  (new rows into a `SubsetEstimator` + `compute_scores`, in this process);
  the rest is the debounce, store reads, persistence and the push.
* GetMixture throughput and latency with ``--clients`` concurrent clients, each
  a separate process with its own channel calling in a closed loop. Baseline:
  the same load against a bare grpc.aio server (no instrumentation, no jobs)
  that returns the same Mixture message, started in the same run.
* fan-out: ``--watchers`` WatchMixture streams (in ``--watcher-processes``
  separate asyncio processes, 4 channels each)
  all holding the latest version; then one commit; the time from the new
  version's creation (Mixture.created_at) until the last stream has it, and
  from the commit itself. Streams that end (an RPC error) instead of
  delivering a version are counted, with their status codes.

The last line is::

    server: commit_to_push_p50_s=<...> get_mixture_qps=<...> \
        get_mixture_p99_ms=<...> fanout_200_s=<...> fanout_failed=<streams> \
        reestimate_p50_s=<...> \
        bare_qps=<...> bare_p99_ms=<...> qps_vs_bare=<...>

(one line; broken here only for width).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventT
from pathlib import Path

import grpc
import numpy as np
from gradmix.demo.planted import planted_tasks
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server.config import ServerConfig
from gradmix.server.convert import policy_enum
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.policies import compute_scores
from gradmix.store import SketchStore
from gradmix.vocabulary import Policy
from gradmix.vocabulary.policy_settings import PolicyConfig
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spawn import spawn_server

JOB = "bench"
ANCHOR = "a0"


@dataclass
class Setup:
    address: str
    store: SketchStore
    stub: pb_grpc.SelectionServiceStub
    tasks: dict[str, tuple[np.ndarray, np.ndarray]]
    target: tuple[np.ndarray, np.ndarray]
    dim: int
    labels: dict[str, str]
    committed: dict[str | None, int]


def start_server(store_dir: Path) -> tuple[subprocess.Popen[str], str]:
    return spawn_server([sys.executable, "-m", "gradmix.server.app", "--store", str(store_dir),
                         "--port", "0", "--metrics-port", "0", "--log-level", "WARNING",
                         "--insecure"])


def p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ----------------------------------------------------------------- setup


def set_up(address: str, store_dir: Path, n_tasks: int, dim: int, rows: int,
           subset_count: int, policy: str = "") -> Setup:
    """A job with every task and the target sketched at a complete anchor."""
    n_helpful = n_tasks // 3
    n_harmful = n_tasks // 3
    target_g, target_v, tasks, labels = planted_tasks(
        n_helpful, n_harmful, n_tasks - n_helpful - n_harmful, 4 * rows, dim, seed=0)
    stub = pb_grpc.SelectionServiceStub(grpc.insecure_channel(address))
    stub.CreateJob(pb.CreateJobRequest(name=JOB, spec=pb.JobSpec(
        sketch=pb.SketchSpec(dim=dim, seed=1, dtype=pb.SKETCH_DTYPE_FLOAT32),
        policy=pb.PolicySettings(
            subset_count=subset_count,
            policy=policy_enum(policy) if policy else pb.POLICY_UNSPECIFIED))))
    for task in tasks:
        stub.RegisterTask(pb.RegisterTaskRequest(job=JOB, name=task))
    stub.DeclareAnchor(pb.DeclareAnchorRequest(job=JOB, anchor=ANCHOR, step=0))
    store = SketchStore.open(str(store_dir))
    setup = Setup(address, store, stub, tasks, (target_g, target_v), dim, labels, {})
    commit(setup, None, rows)
    for task in tasks:
        commit(setup, task, rows)
    stub.CompleteAnchor(pb.CompleteAnchorRequest(job=JOB, anchor=ANCHOR))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        mixture = stub.GetMixture(pb.GetMixtureRequest(job=JOB))
        if mixture.anchor == ANCHOR and not mixture.pending_tasks:
            return setup
        time.sleep(0.2)
    raise SystemExit("the server never published an all-active mixture")


def commit(setup: Setup, task: str | None, rows: int, *, flip: bool = False) -> float:
    """Append a source's next `rows` rows and commit them; the time just before the RPC.

    With `flip`, the rows are drawn from a task of the opposite kind (helpful
    for a harmful or neutral task, harmful for a helpful one), so the task's
    effect, and with it the mixture, visibly changes.
    """
    donor = task
    if flip and task is not None:
        wanted = "harmful" if setup.labels[task] == "helpful" else "helpful"
        donor = next(t for t, kind in setup.labels.items() if kind == wanted)
    grads, values = setup.target if donor is None else setup.tasks[donor]
    start = setup.committed.get(task, 0)
    stop = start + rows
    if stop > len(values):
        raise SystemExit(f"out of planted rows for {task}: use fewer --commits")
    setup.committed[task] = stop
    ids = np.arange(start, stop, dtype=np.int64)
    writer = setup.store.writer(JOB, ANCHOR, task, "bench")
    result = writer.append(grads[start:stop], values[start:stop], ids)
    source = pb.SketchSource(job=JOB, anchor=ANCHOR, **(
        {"target": True} if task is None else {"task": task}))
    sent = time.time()
    setup.stub.CommitSketch(pb.CommitSketchRequest(source=source, writer="bench",
                                                   committed_rows=result.committed))
    return sent


# -------------------------------------------------------- commit to push


class VersionWatcher:
    """One WatchMixture stream; records when each version arrived."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        stub = pb_grpc.SelectionServiceStub(self._channel)
        self._call = stub.WatchMixture(pb.WatchMixtureRequest(job=JOB))
        self.arrivals: queue.Queue[tuple[pb.Mixture, float]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for mixture in self._call:
                self.arrivals.put((mixture, time.time()))
        except grpc.RpcError:
            pass

    def next_after(self, version: int, timeout: float = 60.0) -> tuple[pb.Mixture, float]:
        deadline = time.monotonic() + timeout
        while True:
            mixture, at = self.arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
            if mixture.version > version:
                return mixture, at

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


def commit_to_push(setup: Setup, commits: int, rows: int) -> list[float]:
    watcher = VersionWatcher(setup.address)
    latest = setup.stub.GetMixture(pb.GetMixtureRequest(job=JOB)).version
    watcher.next_after(latest - 1)
    names = list(setup.tasks)
    latencies = []
    for i in range(commits):
        sent = commit(setup, names[i % len(names)], rows, flip=True)
        mixture, arrived = watcher.next_after(latest)
        latest = mixture.version
        latencies.append(arrived - sent)
    watcher.close()
    return latencies


def estimate_only(setup: Setup, rows: int, subset_count: int, repeats: int = 5) -> list[float]:
    """The re-estimate alone, in this process: the baseline of commit → push.

    Each repeat does what one commit costs the server's estimator: take in a
    task's new rows, then score every task (`compute_scores`).
    """
    config = PolicyConfig(subset_count=subset_count) if subset_count else PolicyConfig()
    estimator = SubsetEstimator(setup.dim, regularization=config.regularization)
    estimator.add_target_rows(setup.target[0][:rows], setup.target[1][:rows])
    for task, (grads, values) in setup.tasks.items():
        estimator.add_task_rows(task, grads[:rows], values[:rows])
    compute_scores(estimator, config)
    seconds = []
    for task in list(setup.tasks)[:repeats]:
        grads, values = setup.tasks[task]
        start = time.perf_counter()
        estimator.add_task_rows(task, grads[rows:2 * rows], values[rows:2 * rows])
        compute_scores(estimator, config)
        seconds.append(time.perf_counter() - start)
    return seconds


# ---------------------------------------------------------- GetMixture load


def _client_loop(stub: pb_grpc.SelectionServiceStub, duration: float,
                 latencies: list[float]) -> float:
    """Call GetMixture back to back for `duration` s; returns the seconds it ran."""
    request = pb.GetMixtureRequest(job=JOB)
    begin = time.perf_counter()
    end = begin + duration
    stop = begin
    while stop < end:
        start = time.perf_counter()
        stub.GetMixture(request)
        stop = time.perf_counter()
        latencies.append(stop - start)
    return stop - begin


def _get_mixture_clients(address: str, threads: int, duration: float, ready: mp.Queue,
                         go: EventT, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """`threads` clients in one process, each with its own channel."""
    channels = [grpc.insecure_channel(address) for _ in range(threads)]
    stubs = [pb_grpc.SelectionServiceStub(c) for c in channels]
    for stub in stubs:  # connect and warm up
        for _ in range(20):
            stub.GetMixture(pb.GetMixtureRequest(job=JOB))
    ready.put(True)
    go.wait()
    results: list[tuple[list[float], float]] = []

    def run(stub: pb_grpc.SelectionServiceStub) -> None:
        latencies: list[float] = []
        results.append((latencies, _client_loop(stub, duration, latencies)))

    workers = [threading.Thread(target=run, args=(stub,)) for stub in stubs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for channel in channels:
        channel.close()
    out.put(results)


def get_mixture_load(address: str, clients: int, processes: int,
                     duration: float) -> tuple[float, list[float]]:
    """(calls per second over all clients, every call's latency).

    The clients are spread as threads over `processes` processes.
    """
    ctx = mp.get_context("spawn")
    ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    go = ctx.Event()
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    procs = [ctx.Process(target=_get_mixture_clients,
                         args=(address, share, duration, ready, go, out))
             for share in shares if share]
    for proc in procs:
        proc.start()
    for _ in procs:  # spawned clients import and connect first
        ready.get(timeout=300)
    go.set()
    latencies: list[float] = []
    qps = 0.0
    for _ in procs:
        for calls, seconds in out.get(timeout=duration + 120):
            latencies.extend(calls)
            qps += len(calls) / seconds
    for proc in procs:
        proc.join()
    return qps, latencies


def _bare_server(mixture_bytes: bytes, ports: mp.Queue) -> None:  # type: ignore[type-arg]
    """A grpc.aio server whose GetMixture returns a fixed message: the baseline."""
    mixture = pb.Mixture.FromString(mixture_bytes)

    class Bare(pb_grpc.SelectionServiceServicer):
        async def GetMixture(self, request: pb.GetMixtureRequest,  # type: ignore[override]
                             context: aio.ServicerContext) -> pb.Mixture:
            return mixture

    async def serve() -> None:
        server = aio.server()
        # The generated base class declares every RPC; the bare server answers
        # GetMixture alone (the others answer UNIMPLEMENTED, as the base class does).
        pb_grpc.add_SelectionServiceServicer_to_server(Bare(), server)  # type: ignore[abstract]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


# ------------------------------------------------------------------ fan-out


def _fanout_watchers(address: str, watchers: int, after: int, ready: mp.Queue,
                     out: mp.Queue) -> None:  # type: ignore[type-arg]
    async def run() -> None:
        channels = [aio.insecure_channel(address) for _ in range(4)]
        stubs = [pb_grpc.SelectionServiceStub(c) for c in channels]
        calls = [stubs[i % 4].WatchMixture(pb.WatchMixtureRequest(
            job=JOB, after_version=after - 1)) for i in range(watchers)]
        # Every stream holds the current version; a stream that ends instead is
        # counted (and left out), not waited for.
        first = await asyncio.gather(*(call.read() for call in calls), return_exceptions=True)
        live = [c for c, m in zip(calls, first, strict=True) if isinstance(m, pb.Mixture)]
        ended = [m for m in first if not isinstance(m, pb.Mixture)]
        ready.put(True)
        results = await asyncio.gather(*(call.read() for call in live), return_exceptions=True)
        arrived = time.time()
        mixtures = [m for m in results if isinstance(m, pb.Mixture)]
        codes = sorted({str(e.code()) if isinstance(e, grpc.RpcError) else repr(e)
                        for e in [*ended, *(r for r in results if not isinstance(r, pb.Mixture))]})
        out.put((arrived, [m.version for m in mixtures],
                 mixtures[0].created_at.ToNanoseconds() / 1e9 if mixtures else arrived,
                 watchers - len(mixtures), codes))
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()

    asyncio.run(run())


def fanout(setup: Setup, watchers: int, rows: int,
           processes: int = 1) -> tuple[float, float, int, list[str]]:
    """(last arrival after the version's creation, after the commit, streams that
    ended, their codes), the streams spread over `processes` client processes."""
    ctx = mp.get_context("spawn")
    ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    latest = setup.stub.GetMixture(pb.GetMixtureRequest(job=JOB)).version
    shares = [watchers // processes + (i < watchers % processes) for i in range(processes)]
    procs = [ctx.Process(target=_fanout_watchers, args=(setup.address, share, latest, ready, out))
             for share in shares if share]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    sent = commit(setup, list(setup.tasks)[-1], rows, flip=True)
    parts = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    versions = [v for part in parts for v in part[1]]
    assert all(v == versions[0] > latest for v in versions), versions
    arrived = max(part[0] for part in parts)
    created = min(part[2] for part in parts)
    codes = sorted({code for part in parts for code in part[4]})
    return arrived - created, arrived - sent, sum(part[3] for part in parts), codes


# --------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client-processes", type=int, default=2,
                        help="processes the GetMixture clients are spread over (as threads)")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--watcher-processes", type=int, default=1,
                        help="client processes the watch streams are spread over")
    parser.add_argument("--policy", choices=[p.value for p in Policy], default="",
                        help="the job's policy (default: the server's)")
    parser.add_argument("--subset-count", type=int, default=0,
                        help="the job's ensemble subset count (0: the server default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server, address = start_server(Path(tmp) / "store")
        try:
            t0 = time.perf_counter()
            setup = set_up(address, Path(tmp) / "store", args.tasks, args.dim, args.rows,
                           args.subset_count, args.policy)
            print(f"setup: {args.tasks} tasks, d={args.dim}, {args.rows} rows each, "
                  f"first all-active mixture after {time.perf_counter() - t0:.1f} s", flush=True)

            latencies = commit_to_push(setup, args.commits, args.rows)
            baseline = estimate_only(setup, args.rows, args.subset_count)
            print(f"commit_to_push: n={len(latencies)} p50={p(latencies, 50):.3f}s "
                  f"p99={p(latencies, 99):.3f}s | baseline re-estimate alone "
                  f"(add rows + compute_scores, subset_count={args.subset_count or 'default'}) "
                  f"p50={p(baseline, 50):.3f}s; "
                  f"debounce {ServerConfig(insecure=True).debounce_seconds}s",
                  flush=True)

            qps, get_lat = get_mixture_load(address, args.clients, args.client_processes,
                                            args.duration)
            mixture = setup.stub.GetMixture(pb.GetMixtureRequest(job=JOB))
            ctx = mp.get_context("spawn")
            ports: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
            bare = ctx.Process(target=_bare_server, args=(mixture.SerializeToString(), ports),
                               daemon=True)
            bare.start()
            bare_qps, bare_lat = get_mixture_load(f"127.0.0.1:{ports.get(timeout=60)}",
                                                  args.clients, args.client_processes,
                                                  args.duration)
            bare.terminate()
            print(f"get_mixture: clients={args.clients} qps={qps:.0f} "
                  f"p50={1e3 * p(get_lat, 50):.2f}ms p99={1e3 * p(get_lat, 99):.2f}ms | "
                  f"baseline bare grpc.aio qps={bare_qps:.0f} "
                  f"p99={1e3 * p(bare_lat, 99):.2f}ms "
                  f"({len(mixture.weights)}-task Mixture, {mixture.ByteSize()} bytes)", flush=True)

            from_publish, from_commit, failed, codes = fanout(setup, args.watchers, args.rows,
                                                              args.watcher_processes)
            print(f"fanout: watchers={args.watchers} "
                  f"(over {args.watcher_processes} client process(es)) last received "
                  f"{from_publish:.3f}s after the version was created, "
                  f"{from_commit:.3f}s after the commit; "
                  f"{failed} stream(s) ended without it {codes}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"server: commit_to_push_p50_s={p(latencies, 50):.3f} get_mixture_qps={qps:.0f} "
          f"get_mixture_p99_ms={1e3 * p(get_lat, 99):.2f} "
          f"fanout_{args.watchers}_s={from_publish:.3f} fanout_failed={failed} "
          f"reestimate_p50_s={p(baseline, 50):.3f} bare_qps={bare_qps:.0f} "
          f"bare_p99_ms={1e3 * p(bare_lat, 99):.2f} qps_vs_bare={qps / bare_qps:.2f}")


if __name__ == "__main__":
    main()
