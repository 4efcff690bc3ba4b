"""Benchmark: the selection server under mixed load, with TLS and tokens on and off.

Run by hand: ``.venv/bin/python bench/load.py`` (defaults: 8 GetMixture
clients, 32 watchers, 20 tasks, d = 64, 10 s of load per run).

It starts ``gradmix-server`` as a subprocess three times on fresh stores:
with TLS (a CA and certificates made by ``scripts/make_certs.py``) and a token
table, every client holding a token of the role it needs; ``--insecure`` with
the token table (the token check's share); ``--insecure`` without tokens, the
baseline. Each run sets up one job (every task and the target sketched at a
complete anchor), then, for ``--seconds``:

* ``--clients`` processes call GetMixture in a closed loop (qps, p99 latency);
* ``--watchers`` WatchMixture streams (one asyncio process, a channel each)
  receive every new version; fan-out is the time from a version's creation
  (Mixture.created_at) until a watcher has it, p99 over versions × watchers;
* a writer uploads a burst of new rows for a few tasks every ``--burst-every``
  seconds (UploadSketch), so the server re-estimates and publishes;
* one client runs heavy queries back to back: EstimateSubsets of
  ``--heavy-subsets`` random subsets in exact mode (p99 latency).

The last line is::

    load: qps=<...> p99_ms=<...> watchers=<M> fanout_s=<...> heavy_p99_ms=<...> \
        insecure_qps=<...> insecure_p99_ms=<...> insecure_fanout_s=<...> \
        insecure_heavy_p99_ms=<...> qps_ratio=<tls/insecure> p99_ratio=<tls/insecure>

(one line; broken here only for width). Every number comes from this run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventT
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from gradmix.client import SelectionClient, SketchSpec
from gradmix.demo.planted import planted_tasks
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server.auth import hash_token

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spawn import spawn_server

ROOT = Path(__file__).resolve().parents[1]
JOB, ANCHOR = "load", "a0"
TOKENS = {"admin": "bench-admin-token", "writer": "bench-writer-token",
          "reader": "bench-reader-token"}


@dataclass(frozen=True)
class Access:
    """How clients reach one server run: address, CA (None: plaintext), tokens or not."""

    address: str
    ca: bytes | None
    tokens: bool

    def token(self, role: str) -> str | None:
        return TOKENS[role] if self.tokens else None

    def client(self, role: str, timeout: float = 60.0) -> SelectionClient:
        return SelectionClient(self.address, timeout=timeout, tls=self.ca is not None,
                               root_certificates=self.ca, token=self.token(role))


def _make_certs(out: Path) -> Any:
    spec = importlib.util.spec_from_file_location("make_certs", ROOT / "scripts" / "make_certs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_certs"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module.make_certs(out)


#: The runs: (TLS, tokens). The first is the subject, the last the baseline.
MODES = {"tls+tokens": (True, True), "insecure+tokens": (False, True),
         "insecure": (False, False)}


def start_server(work: Path, tls: bool, tokens: bool) -> tuple[subprocess.Popen[str], Access]:
    args = [sys.executable, "-m", "gradmix.server.app", "--store", str(work / "store"),
            "--port", "0", "--metrics-port", "0", "--log-level", "WARNING"]
    ca = None
    if tokens:
        table = work / "tokens"
        table.write_text("".join(f"{hash_token(t)} {role} * bench-{role}\n"
                                 for role, t in TOKENS.items()))
        args += ["--auth-tokens-file", str(table)]
    if tls:
        certs = _make_certs(work / "pki")
        args += ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
        ca = certs.ca.read_bytes()
    else:
        args.append("--insecure")
    process, address = spawn_server(args)
    return process, Access(address, ca, tokens)


def set_up(access: Access, n_tasks: int, dim: int, rows: int) -> list[str]:
    """A job with every task and the target sketched at a complete anchor; its tasks."""
    third = n_tasks // 3
    target_g, target_v, tasks, _ = planted_tasks(third, third, n_tasks - 2 * third, rows,
                                                 dim, seed=0)
    with access.client("admin") as client:
        client.create_job(JOB, sketch=SketchSpec(dim=dim, seed=1))
        for task in tasks:
            client.register_task(JOB, task)
        client.declare_anchor(JOB, ANCHOR, 0)
        ids = np.arange(rows)
        client.upload_sketch(JOB, ANCHOR, None, "setup", target_g, target_v, ids)
        for task, (grads, values) in tasks.items():
            client.upload_sketch(JOB, ANCHOR, task, "setup", grads, values, ids)
        client.complete_anchor(JOB, ANCHOR)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                mixture = client.get_mixture(JOB)
                if mixture.anchor == ANCHOR and not mixture.pending_tasks:
                    return sorted(tasks)
            except Exception:  # NotFound until the first version
                pass
            time.sleep(0.2)
    raise SystemExit("the server never published an all-active mixture")


# ----------------------------------------------------------------- load processes


def get_mixture_loop(access: Access, start: EventT, stop: EventT, out: Any) -> None:
    latencies: list[float] = []
    errors = 0
    with access.client("reader", timeout=10.0) as client:
        client.get_mixture(JOB)  # connected (and TLS handshaken) before the clock starts
        start.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                client.get_mixture(JOB)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
    out.put(("get", latencies, errors))


def watchers(access: Access, count: int, ready: EventT, stop: EventT, out: Any) -> None:
    asyncio.run(_watch_all(access, count, ready, stop, out))


async def _watch_all(access: Access, count: int, ready: EventT, stop: EventT,
                     out: Any) -> None:
    delays: list[float] = []
    errors = 0
    token = access.token("reader")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channels = []
    for _ in range(count):
        if access.ca is None:
            channels.append(grpc.aio.insecure_channel(access.address))
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=access.ca)
            channels.append(grpc.aio.secure_channel(access.address, creds))
    latest = pb_grpc.SelectionServiceStub(channels[0]).GetMixture(
        pb.GetMixtureRequest(job=JOB), metadata=metadata)
    after = (await latest).version
    started = 0

    async def follow(channel: grpc.aio.Channel) -> None:
        nonlocal errors, started
        stream = pb_grpc.SelectionServiceStub(channel).WatchMixture(
            pb.WatchMixtureRequest(job=JOB, after_version=after), metadata=metadata)
        started += 1
        try:
            async for mixture in stream:
                delays.append(time.time() - mixture.created_at.ToNanoseconds() / 1e9)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                errors += 1

    tasks = [asyncio.create_task(follow(c)) for c in channels]
    while started < count:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # every stream open at the server
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # the last burst's version reaches everyone
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    out.put(("watch", delays, errors))


def commit_bursts(access: Access, tasks: list[str], dim: int, rows: int, every: float,
                  start: EventT, stop: EventT, out: Any) -> None:
    rng = np.random.default_rng(1)
    bursts = 0
    next_id = 10_000_000
    with access.client("writer") as client:
        start.wait()
        while not stop.is_set():
            t0 = time.monotonic()
            for task in rng.choice(tasks, size=min(3, len(tasks)), replace=False):
                grads = rng.standard_normal((rows, dim)).astype(np.float32)
                values = 0.5 * rng.standard_normal(rows)
                ids = np.arange(next_id, next_id + rows)
                next_id += rows
                client.upload_sketch(JOB, ANCHOR, str(task), "bench", grads, values, ids)
            bursts += 1
            stop.wait(max(0.0, every - (time.monotonic() - t0)))
    out.put(("bursts", [float(bursts)], 0))


def heavy_queries(access: Access, tasks: list[str], subsets: int, start: EventT,
                  stop: EventT, out: Any) -> None:
    rng = np.random.default_rng(2)
    latencies: list[float] = []
    errors = 0
    with access.client("reader", timeout=120.0) as client:
        start.wait()
        while not stop.is_set():
            chosen = [list(rng.choice(tasks, size=len(tasks) // 2, replace=False))
                      for _ in range(subsets)]
            t0 = time.perf_counter()
            try:
                client.estimate_subsets(JOB, chosen, "exact")
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
    out.put(("heavy", latencies, errors))


# ----------------------------------------------------------------- one run


@dataclass
class Result:
    qps: float
    p99_ms: float
    fanout_s: float
    heavy_p99_ms: float
    versions_seen: int
    errors: int
    bursts: int
    heavy_calls: int


def p99(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 99)) if values else float("nan")


def run(args: argparse.Namespace, tls: bool, tokens: bool) -> Result:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gradmix-load-") as tmp:
        process, access = start_server(Path(tmp), tls, tokens)
        try:
            tasks = set_up(access, args.tasks, args.dim, args.rows)
            start, stop, ready = ctx.Event(), ctx.Event(), ctx.Event()
            out = ctx.Queue()
            procs = [ctx.Process(target=get_mixture_loop, args=(access, start, stop, out))
                     for _ in range(args.clients)]
            procs.append(ctx.Process(target=watchers,
                                     args=(access, args.watchers, ready, stop, out)))
            procs.append(ctx.Process(target=commit_bursts, args=(
                access, tasks, args.dim, args.burst_rows, args.burst_every, start, stop, out)))
            procs.append(ctx.Process(target=heavy_queries,
                                     args=(access, tasks, args.heavy_subsets, start, stop, out)))
            for proc in procs:
                proc.start()
            if not ready.wait(120):
                raise SystemExit("watchers did not connect within 120 s")
            time.sleep(2.0)  # the GetMixture clients have connected
            start.set()
            t0 = time.monotonic()
            time.sleep(args.seconds)
            stop.set()
            elapsed = time.monotonic() - t0
            results: dict[str, list[Any]] = {"get": [], "watch": [], "bursts": [], "heavy": []}
            errors = 0
            for _ in procs:
                kind, values, errs = out.get(timeout=300)
                results[kind].append(values)
                errors += errs
            for proc in procs:
                proc.join(timeout=60)
        finally:
            process.terminate()
            process.wait(timeout=60)
    gets = [x for values in results["get"] for x in values]
    delays = [x for values in results["watch"] for x in values]
    heavy = [x for values in results["heavy"] for x in values]
    return Result(qps=len(gets) / elapsed, p99_ms=1e3 * p99(gets), fanout_s=p99(delays),
                  heavy_p99_ms=1e3 * p99(heavy),
                  versions_seen=len(delays) // max(1, args.watchers), errors=errors,
                  bursts=int(sum(sum(v) for v in results["bursts"])), heavy_calls=len(heavy))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="GetMixture processes")
    parser.add_argument("--watchers", type=int, default=32, help="WatchMixture streams")
    parser.add_argument("--seconds", type=float, default=10.0, help="load per run")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=32, help="rows per task at set-up")
    parser.add_argument("--burst-every", type=float, default=2.0, help="seconds between bursts")
    parser.add_argument("--burst-rows", type=int, default=8, help="rows per task per burst")
    parser.add_argument("--heavy-subsets", type=int, default=16,
                        help="subsets per exact EstimateSubsets call")
    args = parser.parse_args(argv)
    if min(args.clients, args.watchers, args.tasks) < 1 or args.seconds <= 0:
        parser.error("clients, watchers, tasks and seconds must be positive")
    runs = {}
    for name, (secure, tokens) in MODES.items():
        result = run(args, secure, tokens)
        runs[name] = result
        print(f"{name:15s} qps={result.qps:.0f} p99_ms={result.p99_ms:.1f} "
              f"fanout_s={result.fanout_s:.3f} heavy_p99_ms={result.heavy_p99_ms:.0f} "
              f"heavy_calls={result.heavy_calls} bursts={result.bursts} "
              f"versions={result.versions_seen} errors={result.errors}", flush=True)
    tls, plain = runs["tls+tokens"], runs["insecure"]
    print(f"load: qps={tls.qps:.0f} p99_ms={tls.p99_ms:.1f} watchers={args.watchers} "
          f"fanout_s={tls.fanout_s:.3f} heavy_p99_ms={tls.heavy_p99_ms:.0f} "
          f"insecure_qps={plain.qps:.0f} insecure_p99_ms={plain.p99_ms:.1f} "
          f"insecure_fanout_s={plain.fanout_s:.3f} "
          f"insecure_heavy_p99_ms={plain.heavy_p99_ms:.0f} "
          f"qps_ratio={tls.qps / plain.qps:.2f} p99_ratio={tls.p99_ms / plain.p99_ms:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
