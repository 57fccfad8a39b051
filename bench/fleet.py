"""A fleet simulator: many light workers speaking the real worker protocol to real servers.

`.venv/bin/python bench/fleet.py --workers 50,200,500 --store sqlite,postgres --replicas 1,2`

Each simulated worker is a thread with the worker runtime's own `HttpQueue` (the requests,
sequence numbers and retries of `python -m cortex.worker`): it reports `initializing`, reads
the spec, reports `running`, then leases one batch at a time, ships the batch's `processing
batch` log line (a worker's log shipper would), "predicts" by sleeping a fixed think time
(`--think-ms`, default 1000: a GPU worker with 1-second batches), and reports the result with
its next lease, as a real worker does. Heartbeats go at the server's period
(`heartbeat_s` from the spec) from a few heartbeat threads, through the same queue objects,
and a client reads the job's status 10 times a second. Worker starts are spread over one
think time, so the fleet does not lease in lock step.

The servers are real `cortex serve` processes: one on SQLite, or 1 or 2 replicas on a fresh
PostgreSQL database (127.0.0.1:5432 as user postgres, or CORTEX_BENCH_POSTGRES=<admin url>),
the workers spread over the replicas. Each size runs one job of trivial batches (or `--jobs
N`, the workers dealt out among them); the simulated workers are added to it as worker rows
of the replica they talk to (as a launcher would), and the job's one real worker (the server
starts it) waits in its predictor's `__init__` and takes no batches.

Measured over a window of `--duration` seconds after a warm-up: leases and batches per
second, latencies (p50, p99) of leases, heartbeats and status reads, and CPU: the servers'
(psutil, user + system), PostgreSQL's (the backends connected to the bench's database; the
server's shared background processes are not counted) and the simulator's own. On SQLite the
store runs inside the server: its share is the fraction of the server's py-spy samples (50 Hz,
active threads) that are in SQLAlchemy's calls into the database driver. Then, with leasing
paused, calibrations give the cost of one status read (a client alone), one heartbeat (ten
times the usual rate) and one log shipment (a line per think time, no leases); the cost of a
lease (with one result and one batch) is what is left of the window's CPU, per lease. With
`--per-batch`, a second window leases 8 batches at a time to split a lease's cost into a part
per request and a part per batch. On PostgreSQL the window also counts, 5 times a second, the
bench database's backends waiting for a lock. `--json FILE` keeps the raw results,
`--report FILE` prints the tables of such a file again, and `--write` puts the tables into
bench/README.md (`bench/fleetcpu.py` counts the CPU, `bench/fleetreport.py` writes the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fleetcpu import Cpu, sampled  # noqa: E402
from fleetreport import report  # noqa: E402
from scale import ADMIN_URL, Server  # noqa: E402

from cortex.client import Client  # noqa: E402
from cortex.errors import CortexError  # noqa: E402
from cortex.settings import Settings  # noqa: E402
from cortex.store import Store, sql  # noqa: E402
from cortex.worker.queue import HttpQueue, JobGone  # noqa: E402

API = "fleet"
# The job's one real worker waits here: the simulated workers take every batch.
PREDICTOR = """
import time


class PythonPredictor:
    def __init__(self, config):
        time.sleep(24 * 3600)

    def predict(self, payload):
        pass
"""
CONFIG = f"- name: {API}\n  kind: BatchAPI\n  predictor: {{type: python, path: predictor.py}}\n"
HEARTBEAT_THREADS = 8
STATUS_PER_S = 10


class Retries(logging.Handler):
    """Counts the worker queue's "retrying" warnings (a request sent again after a dropped
    connection or a 5xx) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


RETRIES = Retries()
logging.getLogger("cortex").addHandler(RETRIES)
logging.getLogger("cortex").propagate = False


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class Fleet:
    """The simulated workers of one job, and what they saw."""

    think_s: float
    batches_per_lease: int = 1
    stopped: threading.Event = field(default_factory=threading.Event)
    # "lease": workers lease and ship a log line per batch; "logs": they only ship a line per
    # think time; "pause": nothing but heartbeats (the calibrations).
    mode: str = "lease"
    ship_logs: bool = True
    heartbeat_scale: float = 1.0  # the heartbeat period is multiplied by this
    leases: list[tuple[float, float, int]] = field(default_factory=list)  # (end, ms, batches)
    heartbeats: list[tuple[float, float]] = field(default_factory=list)
    statuses: list[tuple[float, float]] = field(default_factory=list)
    shipments: list[tuple[float, float]] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=lambda: [0])  # leases sent, not answered
    counting: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)

    def worker(self, queue: HttpQueue, start_delay_s: float) -> None:
        try:
            queue.set_state("initializing", pid=os.getpid())
            queue.spec()
            queue.set_state("running", has_hook=False)
            self.running.append(queue.worker_id)
            self.stopped.wait(start_delay_s)
            results: list[dict[str, Any]] = []
            while not self.stopped.is_set():
                if self.mode == "logs":
                    self.stopped.wait(self.think_s - self._ship(queue, [None]))
                    continue
                if self.mode != "lease":
                    self.stopped.wait(0.25)
                    continue
                sent = time.perf_counter()
                with self.counting:
                    self.in_flight[0] += 1
                try:
                    reply = queue.lease(results, self.batches_per_lease)
                finally:
                    with self.counting:
                        self.in_flight[0] -= 1
                done = time.perf_counter()
                batches = reply["batches"]
                self.leases.append((done, (done - sent) * 1000, len(batches)))
                results = []
                if batches:
                    think = self.think_s * len(batches)
                    if self.ship_logs:  # a worker's "processing batch" lines
                        think -= self._ship(queue, [b["batch_id"] for b in batches])
                    self.stopped.wait(think)
                    each = think / len(batches)
                    results = [
                        {"batch_id": b["batch_id"], "ok": True, "duration_s": each} for b in batches
                    ]
                elif reply.get("done"):
                    return
                else:
                    self.stopped.wait(0.25)
        except JobGone:
            pass
        except Exception as err:  # counted and reported: a simulator must not hide failures
            self.errors.append(f"{queue.worker_id}: {err.__class__.__name__}: {err}")

    def _ship(self, queue: HttpQueue, batch_ids: list[str | None]) -> float:
        """Ship a log line per batch, as the worker's log shipper would; its time in seconds."""
        now = time.time()
        lines = [[now, "log", "INFO", b, f"cortex: processing batch {b}"] for b in batch_ids]
        sent = time.perf_counter()
        queue.ship_logs(lines, 0)
        took = time.perf_counter() - sent
        self.shipments.append((time.perf_counter(), took * 1000))
        return took

    def heartbeat(self, queues: list[HttpQueue], period_s: float) -> None:
        next_at = time.perf_counter()
        while not self.stopped.is_set():
            for queue in queues:
                if self.stopped.is_set():
                    return
                sent = time.perf_counter()
                try:
                    queue.heartbeat()
                except JobGone:
                    return
                except Exception as err:
                    self.errors.append(f"heartbeat: {err}")
                done = time.perf_counter()
                self.heartbeats.append((done, (done - sent) * 1000))
                next_at += period_s * self.heartbeat_scale / len(queues)
                self.stopped.wait(max(0.0, next_at - time.perf_counter()))

    def status(self, urls: list[str], job_id: str, per_s: float) -> None:
        clients = [httpx.Client(base_url=url, timeout=30) for url in urls]
        try:
            n = 0
            next_at = time.perf_counter()
            while not self.stopped.is_set():
                sent = time.perf_counter()
                clients[n % len(clients)].get(f"/{API}", params={"jobID": job_id})
                done = time.perf_counter()
                self.statuses.append((done, (done - sent) * 1000))
                n += 1
                next_at += 1 / per_s if per_s else 0
                self.stopped.wait(max(0.0, next_at - time.perf_counter()))
        finally:
            for client in clients:
                client.close()


# -- one configuration --------------------------------------------------------------------------


def window(fleet: Fleet, cpu: Cpu, seconds: float, spy_pid: int | None, folder: Path) -> dict:
    marks = len(fleet.leases), len(fleet.heartbeats), len(fleet.statuses), len(fleet.shipments)
    before = cpu.snapshot()
    share: dict[str, float] = {}
    waits: list[int] = []
    with contextlib.ExitStack() as stack:
        if spy_pid is not None:
            share = stack.enter_context(sampled(spy_pid, seconds, folder))
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:  # lock waits, 5 times a second
            waits.append(cpu.lock_waits())
            time.sleep(max(0.0, min(0.2, end - time.perf_counter())))
    after = cpu.snapshot()
    used = Cpu.used(before, after)
    leases = fleet.leases[marks[0] :]
    heartbeats = fleet.heartbeats[marks[1] :]
    statuses = fleet.statuses[marks[2] :]
    shipments = fleet.shipments[marks[3] :]
    wall = used["wall"]
    return {
        **used,
        "spy": dict(share),
        "lock waiters": sum(waits) / max(1, len(waits)),
        "leases": len(leases),
        "batches": sum(b for _, _, b in leases),
        "heartbeats": len(heartbeats),
        "statuses": len(statuses),
        "shipments": len(shipments),
        "logs p50": pct([ms for _, ms in shipments], 0.5),
        "logs p99": pct([ms for _, ms in shipments], 0.99),
        "leases/s": len(leases) / wall,
        "batches/s": sum(b for _, _, b in leases) / wall,
        "lease p50": pct([ms for _, ms, _ in leases], 0.5),
        "lease p99": pct([ms for _, ms, _ in leases], 0.99),
        "heartbeat p50": pct([ms for _, ms in heartbeats], 0.5),
        "heartbeat p99": pct([ms for _, ms in heartbeats], 0.99),
        "status p50": pct([ms for _, ms in statuses], 0.5),
        "status p99": pct([ms for _, ms in statuses], 0.99),
    }


def run_size(
    servers: list[Server],
    store: Store,
    cpu: Cpu,
    workers: int,
    args: argparse.Namespace,
    folder: Path,
    calibrate: bool,
) -> dict[str, Any]:
    think_s = args.think_ms / 1000
    batches = int(workers * (args.duration * 3 + 30) / think_s / args.jobs) + 1000
    replica_ids = [httpx.get(f"{s.url}/healthz").json()["replica_id"] for s in servers]
    job_ids: list[str] = []
    queues: list[HttpQueue] = []
    for j in range(args.jobs):
        with Client(servers[j % len(servers)].url) as client:
            body = {"workers": 1, "item_list": {"items": list(range(batches)), "batch_size": 1}}
            job_id = client.submit(API, body)["job_id"]
        job_ids.append(job_id)
        job = store.get_job(job_id)
        assert job is not None
        for r, server in enumerate(servers):
            # Worker n of the fleet: job n % jobs, replica n % replicas.
            count = len(range(j, workers, args.jobs)[r :: len(servers)])
            for worker_id in store.add_workers(job_id, count, replica_ids[r]):
                queues.append(HttpQueue(server.url, job_id, worker_id, job.worker_token, 60.0))
    fleet = Fleet(think_s, ship_logs=not args.no_logs)
    retries = RETRIES.count
    rng = random.Random(0)
    threads = [
        threading.Thread(target=fleet.worker, args=(q, rng.uniform(0, think_s)), daemon=True)
        for q in queues
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while len(fleet.running) < workers and time.monotonic() < deadline and not fleet.errors:
        time.sleep(0.05)
    if len(fleet.running) < workers:
        raise SystemExit(f"only {len(fleet.running)} of {workers} workers started: {fleet.errors}")
    heartbeat_s = float(queues[0].spec()["heartbeat_s"])
    helpers = [
        threading.Thread(
            target=fleet.heartbeat, args=(queues[i::HEARTBEAT_THREADS], heartbeat_s), daemon=True
        )
        for i in range(min(HEARTBEAT_THREADS, len(queues)))
    ]
    helpers.append(
        threading.Thread(
            target=fleet.status,
            args=([s.url for s in servers], job_ids[0], STATUS_PER_S),
            daemon=True,
        )
    )
    for thread in helpers:
        thread.start()
    time.sleep(think_s + args.warmup)
    spy_pid = servers[0].process.pid if not args.no_spy else None
    result: dict[str, Any] = {"workers": workers, "demand/s": workers / think_s, "jobs": args.jobs}
    result["steady"] = window(fleet, cpu, args.duration, spy_pid, folder)
    if args.per_batch and calibrate:
        fleet.batches_per_lease = 8
        time.sleep(8 * think_s + 1)
        result["eight"] = window(fleet, cpu, args.duration, None, folder)
        fleet.batches_per_lease = 1
    if calibrate:
        fleet.mode = "pause"
        time.sleep(think_s * fleet.batches_per_lease)  # the last leases come back
        deadline = time.monotonic() + 60
        while fleet.in_flight[0] > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        fleet.heartbeat_scale = 0.1  # ten times the heartbeats
        time.sleep(1)
        result["heartbeats_only"] = window(fleet, cpu, min(args.duration, 5), None, folder)
        fleet.heartbeat_scale = 1.0
        if fleet.ship_logs:
            fleet.mode = "logs"
            time.sleep(think_s + 1)
            result["logs_only"] = window(fleet, cpu, min(args.duration, 5), None, folder)
    fleet.stopped.set()
    with Client(servers[0].url) as client:
        # How the jobs stood at the end (a job may have ended meanwhile: expired leases, say).
        result["job_status"] = [client.get_job(API, j)["job_status"]["status"] for j in job_ids]
        for job_id in job_ids:
            with contextlib.suppress(CortexError):
                client.stop_job(API, job_id)
    for thread in threads + helpers:
        thread.join(30)
    for queue in queues:
        queue.close()
    result["errors"] = list(fleet.errors)
    result["retries"] = RETRIES.count - retries
    return result


def idle(cpu: Cpu, seconds: float) -> dict[str, float]:
    before = cpu.snapshot()
    time.sleep(seconds)
    return Cpu.used(before, cpu.snapshot())


def run_config(
    store_kind: str, replicas: int, args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    folder = root / f"{store_kind}-{replicas}"
    folder.mkdir()
    admin = database = None
    store_url = ""
    if store_kind == "postgres":
        admin = sa.create_engine(
            sa.make_url(sql.engine_url(ADMIN_URL)), isolation_level="AUTOCOMMIT"
        )
        database = f"cortex_fleet_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
        store_url = (
            sa.make_url(sql.engine_url(ADMIN_URL))
            .set(drivername="postgresql", database=database)
            .render_as_string(hide_password=False)
        )
        subprocess.run(
            [sys.executable, "-m", "cortex.cli", "migrate", "--store", store_url],
            check=True,
            capture_output=True,
        )
    servers: list[Server] = []
    store: Store | None = None
    try:
        for r in range(replicas):
            servers.append(Server(folder / f"replica-{r}", store_url))
        url = store_url or Settings(data_dir=folder / "replica-0").resolved_store_url
        store = Store(url)
        with Client(servers[0].url) as client:
            client.deploy(root / "project" / "cortex.yaml")
        cpu = Cpu(servers, admin, database or "")
        result: dict[str, Any] = {"store": store_kind, "replicas": replicas}
        result["idle"] = idle(cpu, 3)
        result["sizes"] = []
        for n, workers in enumerate(args.workers):
            print(f"{store_kind}, {replicas} replica(s), {workers} workers...", file=sys.stderr)
            calibrate = n == len(args.workers) - 1
            result["sizes"].append(run_size(servers, store, cpu, workers, args, folder, calibrate))
        result["status_only"] = status_cost(servers, cpu)
        return result
    finally:
        if store is not None:
            store.close()
        for server in servers:
            server.stop()
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            admin.dispose()


def status_cost(servers: list[Server], cpu: Cpu, seconds: float = 3.0) -> dict[str, float]:
    """Status reads as fast as one client sends them, with nothing else running."""
    with Client(servers[0].url) as client:
        job = client.submit(API, {"workers": 1, "item_list": {"items": [1], "batch_size": 1}})
    fleet = Fleet(1.0)
    thread = threading.Thread(
        target=fleet.status, args=([s.url for s in servers], job["job_id"], 0), daemon=True
    )
    before = cpu.snapshot()
    thread.start()
    time.sleep(seconds)
    fleet.stopped.set()
    thread.join()
    used = Cpu.used(before, cpu.snapshot())
    with Client(servers[0].url) as client, contextlib.suppress(CortexError):
        client.stop_job(API, job["job_id"])
    return {**used, "statuses": len(fleet.statuses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="50,200,500")
    parser.add_argument("--store", default="sqlite,postgres")
    parser.add_argument("--replicas", default="1,2", help="PostgreSQL only; SQLite runs one")
    parser.add_argument("--think-ms", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds after start-up")
    parser.add_argument("--jobs", type=int, default=1, help="the fleet spread over this many")
    parser.add_argument("--per-batch", action="store_true", help="also 8 a lease (largest fleet)")
    parser.add_argument("--no-logs", action="store_true", help="ship no log lines")
    parser.add_argument("--no-spy", action="store_true", help="no py-spy samples")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--write", action="store_true", help="update bench/README.md")
    parser.add_argument("--report", type=Path, help="only the tables of an earlier --json run")
    args = parser.parse_args()
    args.workers = [int(n) for n in args.workers.split(",")]
    if args.report:
        report(json.loads(args.report.read_text()), args)
        return
    configs = []
    for kind in args.store.split(","):
        if kind not in ("sqlite", "postgres"):
            raise SystemExit(f"--store: sqlite or postgres, not {kind!r}")
        for replicas in [1] if kind == "sqlite" else [int(r) for r in args.replicas.split(",")]:
            configs.append((kind, replicas))
    root = Path(tempfile.mkdtemp(prefix="cortex-bench-fleet-"))
    (root / "project").mkdir()
    (root / "project" / "predictor.py").write_text(PREDICTOR)
    (root / "project" / "cortex.yaml").write_text(CONFIG)
    results = []
    try:
        for kind, replicas in configs:
            results.append(run_config(kind, replicas, args, root))
            if args.json:  # as it goes: a long run that fails later keeps what it measured
                args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results, args)


if __name__ == "__main__":
    main()
