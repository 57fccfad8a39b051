"""Scale benchmark: SQLite vs PostgreSQL under a real `cortex serve` with local workers.

Measures, on each store:
- jobs accepted per second: small `item_list` jobs POSTed by 4 client threads (each accepted
  job also starts its one worker process: that is part of accepting it on the local launcher);
- batches processed per second by 1, 2 and 4 workers: one job of N trivial batches, timed from
  the submission to the final status (so it includes the workers' start-up, about a second).

Run: `.venv/bin/python bench/scale.py` (PostgreSQL at 127.0.0.1:5432 as user postgres, or
CORTEX_BENCH_POSTGRES=<admin url>; a fresh database is created and dropped). `--write` puts
the table into bench/README.md under "Scale: SQLite vs PostgreSQL".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

from cortex.client import Client
from cortex.store import sql

ADMIN_URL = os.environ.get("CORTEX_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
HEADING = "## Scale: SQLite vs PostgreSQL"
PREDICTOR = """
class PythonPredictor:
    def __init__(self, config, job_spec):
        pass

    def predict(self, payload, batch_id):
        pass
"""
CONFIG = """
- name: noop
  kind: BatchAPI
  predictor:
    type: python
    path: predictor.py
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, data_dir: Path, store_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "CORTEX_PORT": str(self.port),
            "CORTEX_DATA_DIR": str(data_dir),
            "CORTEX_STORE": store_url,
            "CORTEX_WORKER_GRACE_S": "1",
            "CORTEX_LOG_LEVEL": "warning",
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(data_dir / "server.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cortex.cli", "serve"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"cortex serve exited; see {data_dir / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise SystemExit("cortex serve did not answer /healthz within 30 s")

    def workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []
        return [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    def stop(self) -> None:
        workers = self.workers()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(15)
        for proc in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.log.close()


def wait_until(condition, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def jobs_per_second(server: Server, jobs: int) -> tuple[float, float]:
    """Jobs accepted per second, and the median time of one POST in milliseconds."""
    body = {"workers": 1, "item_list": {"items": list(range(10)), "batch_size": 5}}
    took: list[float] = []

    def post(_: int) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            sent = time.perf_counter()
            response = http.post("/noop", json=body)
            took.append(time.perf_counter() - sent)
            response.raise_for_status()
            return str(response.json()["job_id"])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(post, range(jobs)))
    elapsed = time.perf_counter() - started
    # Let the pool drain before the next measurement.
    with Client(server.url) as client:
        for job_id in ids:
            wait_until(
                lambda j=job_id: (
                    client.get_job("noop", j)["job_status"]["status"]  # type: ignore[misc]
                    not in ("status_enqueuing", "status_running")
                ),
                120,
                "the submitted jobs to end",
            )
    wait_until(lambda: not server.workers(), 60, "the workers to exit")
    return jobs / elapsed, statistics.median(took) * 1000


def batches_per_second(server: Server, workers: int, batches: int) -> float:
    body = {"workers": workers, "item_list": {"items": list(range(batches)), "batch_size": 1}}
    with Client(server.url) as client:
        started = time.perf_counter()
        job_id = client.submit("noop", body)["job_id"]
        status = wait_until(
            lambda: (
                (s := client.get_job("noop", job_id)["job_status"])["status"]
                not in ("status_enqueuing", "status_running")
                and s
            ),
            300,
            "the job to end",
        )
        elapsed = time.perf_counter() - started
    assert status["status"] == "status_succeeded", status
    wait_until(lambda: not server.workers(), 60, "the workers to exit")
    return batches / elapsed


def run(store: str, store_url: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    if store_url:
        subprocess.run(
            [sys.executable, "-m", "cortex.cli", "migrate", "--store", store_url],
            check=True,
            capture_output=True,
        )
    server = Server(root / store, store_url)
    try:
        with Client(server.url) as client:
            client.deploy(root / "noop" / "cortex.yaml")
        accepted, post_ms = jobs_per_second(server, args.jobs)
        result = {"jobs/s": accepted, "POST median, ms": post_ms}
        for workers in (1, 2, 4):
            result[f"batches/s, {workers} worker{'s' if workers > 1 else ''}"] = batches_per_second(
                server, workers, args.batches
            )
        return result
    finally:
        server.stop()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = psutil.virtual_memory().total / (1 << 30)
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {mem_gib:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def table(results: dict[str, dict[str, float]], args: argparse.Namespace, pg: str) -> str:
    columns = list(next(iter(results.values())))
    lines = [
        HEADING,
        "",
        f"`bench/scale.py` ({args.jobs} jobs of 10 items, 4 client threads; one job of "
        f"{args.batches} trivial batches per worker count; real `cortex serve`, local workers).",
        f"Machine: {machine()}; PostgreSQL {pg} on loopback. Batches per second include the "
        "workers' start-up (about a second); jobs per second include starting each job's worker.",
        "",
        "| store | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for store, row in results.items():
        lines.append(f"| {store} | " + " | ".join(f"{row[c]:.0f}" for c in columns) + " |")
    lines += [
        "",
        f"Measured {time.strftime('%Y-%m-%d')}. Jobs per second are bounded by starting each "
        "accepted job's worker process on the same 2 cores, not by the store. More workers do "
        "not process trivial batches faster here: the server (one core) is the bottleneck, and "
        "on PostgreSQL its own processes share the same cores; PostgreSQL is for several "
        "replicas on several machines, not for speed on one.",
    ]
    return "\n".join(lines) + "\n"


def write_readme(section: str, heading: str = HEADING) -> None:
    """Put `section` in bench/README.md in place of the one under `heading` (or at the end)."""
    path = Path(__file__).with_name("README.md")
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--write", action="store_true", help="update bench/README.md")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cortex-bench-scale-"))
    (root / "noop").mkdir()
    (root / "noop" / "predictor.py").write_text(PREDICTOR)
    (root / "noop" / "cortex.yaml").write_text(CONFIG)
    admin = sa.create_engine(sa.make_url(sql.engine_url(ADMIN_URL)), isolation_level="AUTOCOMMIT")
    name = f"cortex_bench_{uuid.uuid4().hex[:10]}"
    results: dict[str, dict[str, float]] = {}
    try:
        with admin.connect() as conn:
            pg = str(conn.execute(sa.text("SHOW server_version")).scalar()).split()[0]
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        pg_url = (
            sa.make_url(sql.engine_url(ADMIN_URL))
            .set(drivername="postgresql", database=name)
            .render_as_string(hide_password=False)
        )
        for store, url in (("SQLite", ""), ("PostgreSQL", pg_url)):
            print(f"{store}...", file=sys.stderr, flush=True)
            results[store] = run(store, url, root, args)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(root, ignore_errors=True)
    section = table(results, args, pg)
    print(section)
    if args.write:
        write_readme(section)


if __name__ == "__main__":
    main()
