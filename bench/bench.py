"""The service's overhead, measured end to end: `make bench` (or `make bench-quick`).

Runs a real `cortex serve` (SQLite, local launcher) in a temporary folder and times each
workload from the POST to the job's final status, worker start-up included, 3 times (1 with
--quick), reporting the median. In the same run it measures the limit: the same predictor over
the same pre-built batches in `multiprocessing.Pool(2).imap_unordered` (no queue, no
durability). Results go to bench/results.json (compared with the previous file, if any) and
into the table of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "predictors"))
import bigfile  # noqa: E402
from predictor import PythonPredictor  # noqa: E402

from cortex.client import Client  # noqa: E402

RESULTS = HERE / "results.json"
README = HERE / "README.md"
START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"


class Server:
    def __init__(self, folder: Path, env: dict[str, str] | None = None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.last_end = 0.0  # the end_time of the last job `submit_and_wait` saw end
        env = {
            **os.environ,
            "CORTEX_PORT": str(port),
            "CORTEX_DATA_DIR": str(folder / "data"),
            "CORTEX_LOG_LEVEL": "warning",
            # W3 posts 200,000 items of 200 characters (about 46 MB) in one request.
            "CORTEX_MAX_BODY_BYTES": str(128 << 20),
            **(env or {}),
        }
        self.log = open(folder / "server.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cortex.cli", "serve"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise RuntimeError("cortex serve did not start")
        self.ps = psutil.Process(self.process.pid)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / (1 << 20)

    def workers(self) -> list[psutil.Process]:
        found = []
        for child in self.ps.children(recursive=True):
            try:
                if any("cortex.worker" in part for part in child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def close(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(15)
        self.log.close()


def submit_and_wait(
    server: Server, body: dict[str, Any], config: dict[str, Any], api: str = "bench"
) -> dict[str, Any]:
    """POST a job and wait for it to end; the total runs from the POST to the job's end_time
    as the server recorded it (same machine, same clock), so polling slowly (every 50 ms, not
    to load the server being measured) costs no precision. The body is encoded before the clock
    starts: the client's JSON encoding (0.4 s for W3 with the standard library) is not the
    service's time."""
    content = orjson.dumps({**body, "config": config})
    started_wall = time.time()
    started = time.perf_counter()
    job = server.http.post(f"/{api}", content=content, headers={"Content-Type": "application/json"})
    job.raise_for_status()
    accepted = time.perf_counter()
    job_id = job.json()["job_id"]
    while True:
        status = server.http.get(f"/{api}", params={"jobID": job_id}).json()["job_status"]
        if status["status"] not in ("status_enqueuing", "status_running"):
            break
        time.sleep(0.05)
    if status["status"] != "status_succeeded":
        raise RuntimeError(f"job {job_id} ended {status['status']}: {status.get('error')}")
    total = _ts(status["end_time"]) - started_wall
    server.last_end = _ts(status["end_time"])
    return {"job_id": job_id, "total_s": total, "accept_s": accepted - started}


def _items(n: int) -> list[int]:
    return list(range(n))


# -- the limit: the same predictor in a process pool ---------------------------------------


def _pool_init(config: dict[str, Any]) -> None:
    global _POOL_PREDICTOR
    _POOL_PREDICTOR = PythonPredictor(config)


_POOL_PREDICTOR: Any = None


def _pool_predict(payload: list[Any]) -> Any:
    return _POOL_PREDICTOR.predict(payload)


def limit(batches: list[list[Any]], config: dict[str, Any]) -> float:
    started = time.perf_counter()
    with multiprocessing.Pool(2, initializer=_pool_init, initargs=(config,)) as pool:
        for _ in pool.imap_unordered(_pool_predict, batches):
            pass
    return time.perf_counter() - started


def batched(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- workloads ------------------------------------------------------------------------------


def w1(server: Server) -> tuple[float, float]:
    items = _items(20_000)
    body = {"workers": 2, "item_list": {"items": items, "batch_size": 10}}
    ours = submit_and_wait(server, body, {"mode": "sum"})["total_s"]
    return ours, limit(batched(items, 10), {"mode": "sum"})


def w2(server: Server) -> tuple[float, float]:
    """Throughput once the workers are up: from the moment the last worker to start makes its
    first predict call to the end of the job, scaled to all 200 batches (the batches the first
    worker did before the second was up are not counted, nor is their time)."""
    items = _items(2_000)
    body = {"workers": 2, "item_list": {"items": items, "batch_size": 10}}
    config = {"mode": "burn", "burn_ms": 5}
    ours = submit_and_wait(server, body, config)
    lines = server.http.get(
        "/bench/logs", params={"jobID": ours["job_id"], "format": "json", "follow": True}
    ).text.splitlines()
    starts: dict[str, list[float]] = {}
    for entry in map(json.loads, lines):
        if entry["message"].startswith("cortex: processing batch"):
            starts.setdefault(entry["worker"], []).append(entry["ts"])
    up = max(min(stamps) for stamps in starts.values())
    after = sum(1 for stamps in starts.values() for ts in stamps if ts >= up)
    status = server.http.get("/bench", params={"jobID": ours["job_id"]}).json()["job_status"]
    steady = (_ts(status["end_time"]) - up) * len(items) / 10 / after
    return steady, limit(batched(items, 10), config)


def w3(server: Server) -> tuple[float, float]:
    items = [{"id": i, "text": "x" * 200} for i in range(200_000)]
    body = {"workers": 2, "item_list": {"items": items, "batch_size": 1000}}
    ours = submit_and_wait(server, body, {"mode": "count"})["total_s"]
    # The server's size 5 s after the job's end (the target: back under 150 MB).
    time.sleep(max(0.0, 5.0 - (time.time() - server.last_end)))
    W3_RSS_AFTER.append(server.rss_mb())
    return ours, limit(batched(items, 1000), {"mode": "count"})


W3_RSS_AFTER: list[float] = []


def w4(server: Server) -> tuple[float, float]:
    """One POST of 1,000,000 items: time until accepted with every batch durable (our POST
    answers after the batches are written); the limit is the SQLite floor (`sqlite_floor`)."""
    items = _items(1_000_000)
    payload = json.dumps({"workers": 1, "item_list": {"items": items, "batch_size": 100}})
    before = server.rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    job = server.http.post(
        "/bench",
        content=payload,
        headers={"content-type": "application/json"},
        params={},
    )
    accepted = time.perf_counter() - started
    done.set()
    sampler.join()
    job.raise_for_status()
    server.http.delete("/bench", params={"jobID": job.json()["job_id"]})
    W4_MEMORY.append(peak[0] - before)
    return accepted, sqlite_floor(payload.encode(), 100)


W4_MEMORY: list[float] = []


def sqlite_floor(body: bytes, batch_size: int) -> float:
    """The raw insert of the same batches: parse the body (orjson), build each batch's JSON
    and insert them into a fresh SQLite file (WAL, 64 KiB pages, as the store's) in one
    transaction, committed. No HTTP, no job, no checks: the floor of a durable submission."""
    with tempfile.TemporaryDirectory(prefix="cortex-floor-") as tmp:
        db = sqlite3.connect(Path(tmp) / "floor.db", isolation_level=None)
        db.execute("PRAGMA page_size = 65536")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE batches (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        started = time.perf_counter()
        items = orjson.loads(body)["item_list"]["items"]
        rows = (
            (i, orjson.dumps(items[at : at + batch_size]).decode())
            for i, at in enumerate(range(0, len(items), batch_size))
        )
        db.execute("BEGIN")
        db.executemany("INSERT INTO batches VALUES (?, ?)", rows)
        db.execute("COMMIT")
        elapsed = time.perf_counter() - started
        db.close()
    return elapsed


# The targets for this round, each checked against the same run's numbers.
TARGETS = [
    ("W1 at most 2.5x the Pool(2) limit", lambda r: _ratio(r, "W1 overhead"), 2.5),
    ("W3 end to end at most 0.45 s", lambda r: _ours(r, "W3 big payload"), 0.45),
    ("W3: server RSS 5 s after, at most 150 MB", lambda r: r.get("w3_rss_after_mb"), 150.0),
    ("W4 at most 2.5x the SQLite floor", lambda r: _ratio(r, "W4 submit"), 2.5),
    ("status p99 under W1's load at most 10 ms", lambda r: r["status_under_load"]["p99_ms"], 10.0),
]


def _ours(results: dict[str, Any], name: str) -> float | None:
    found = results["workloads"].get(name)
    return None if found is None else float(found["ours"])


def _ratio(results: dict[str, Any], name: str) -> float | None:
    found = results["workloads"].get(name)
    return None if found is None else float(found["ours"] / found["limit"])


def target_lines(results: dict[str, Any]) -> list[str]:
    """Each target with the value measured and met / not met (or not measured)."""
    lines = []
    for label, value_of, bound in TARGETS:
        value = value_of(results)
        verdict = "not measured" if value is None else ("met" if value <= bound else "NOT MET")
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"target: {label:45} {shown:>8}  {verdict}")
    return lines


def cold_start(server: Server, folder: Path) -> tuple[float, float]:
    mark = folder / f"first-{time.time_ns()}"
    started_wall = time.time()
    submit_and_wait(
        server,
        {"workers": 1, "item_list": {"items": [1], "batch_size": 1}},
        {"mode": "first", "mark": str(mark)},
    )
    ours = float(mark.read_text()) - started_wall
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return ours, time.perf_counter() - started


def status_under_load(server: Server, samples: int = 600) -> dict[str, float]:
    """GET /<api>?jobID= at 200 requests a second while W1 runs: W1 jobs one after another
    until `samples` requests were made (one W1 gives about 120, too few for a p99)."""
    content = orjson.dumps(
        {
            "workers": 2,
            "item_list": {"items": _items(20_000), "batch_size": 10},
            "config": {"mode": "sum"},
        }
    )
    latencies: list[float] = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        while len(latencies) < samples:
            job = server.http.post(
                "/bench", content=content, headers={"Content-Type": "application/json"}
            ).json()["job_id"]
            next_at = time.perf_counter()
            while True:
                started = time.perf_counter()
                reply = http.get("/bench", params={"jobID": job}).json()
                latencies.append((time.perf_counter() - started) * 1000)
                if reply["job_status"]["status"] not in ("status_enqueuing", "status_running"):
                    break
                next_at += 1 / 200
                time.sleep(max(0.0, next_at - time.perf_counter()))
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "requests": len(latencies),
    }


def log_latency(server: Server) -> dict[str, float]:
    """From a print in a worker to the line in a follower's hands: a predictor prints the time
    every 50 ms for 3 s (a slow printer: its lines wait for the periodic hand-over, not for a
    full buffer) while `GET /<api>/logs?follow=true` streams them."""
    body = {
        "workers": 1,
        "item_list": {"items": [1], "batch_size": 1},
        "config": {"mode": "tick", "ticks": 60, "every_s": 0.05},
    }
    job = server.http.post("/bench", json=body).json()["job_id"]
    delays: list[float] = []
    params = {"jobID": job, "follow": True}
    with server.http.stream("GET", "/bench/logs", params=params, timeout=60) as response:
        for line in response.iter_lines():
            arrived = time.time()
            if " tick " in line:
                delays.append((arrived - float(line.rsplit(" ", 1)[1])) * 1000)
    delays.sort()
    return {
        "p50_ms": statistics.median(delays),
        "max_ms": delays[-1],
        "lines": len(delays),
    }


def worker_rss(server: Server) -> float:
    job = server.http.post(
        "/bench",
        json={
            "workers": 1,
            "item_list": {"items": [1], "batch_size": 1},
            "config": {"mode": "burn", "burn_ms": 3000},
        },
    ).json()["job_id"]
    rss = 0.0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        workers = server.workers()
        if workers:
            time.sleep(1.0)  # the predictor is loaded and burning
            rss = max(w.memory_info().rss for w in server.workers()) / (1 << 20)
            break
        time.sleep(0.01)
    server.http.delete("/bench", params={"jobID": job})
    return rss


def log_overhead(server: Server) -> tuple[float, float]:
    """A predictor printing about 100,000 lines a second (200 batches of 1,000 lines and 10 ms
    of work). The limit: the same job printing nothing, plus what the same prints cost into
    /dev/null, as they would with no capture."""
    items = _items(200)
    body = {"workers": 1, "item_list": {"items": items, "batch_size": 1}}
    quiet = submit_and_wait(server, body, {"mode": "print", "lines": 0, "burn_ms": 10})["total_s"]
    loud = submit_and_wait(server, body, {"mode": "print", "lines": 1000, "burn_ms": 10})["total_s"]
    with open(os.devnull, "w") as devnull:
        started = time.perf_counter()
        for _ in items:
            for i in range(1000):
                print(f"batch line {i} of a predictor that talks a lot", file=devnull)
        printing = time.perf_counter() - started
    return loud, quiet + printing


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- the run -------------------------------------------------------------------------------


def median_of(runs: int, measure: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    ours, lim = zip(*(measure() for _ in range(runs)), strict=True)
    return statistics.median(ours), statistics.median(lim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one run of each, fewer workloads")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md")
    parser.add_argument("--only", action="append", help="run only this workload (repeatable)")
    args = parser.parse_args()
    runs = 1 if args.quick else 3
    folder = Path(tempfile.mkdtemp(prefix="cortex-bench-"))
    server = Server(folder)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "workloads": {},
    }
    try:
        results["idle_server_rss_mb"] = server.rss_mb()
        with Client(server.url) as client:
            client.deploy(HERE / "predictors" / "cortex.yaml")
        workloads: list[tuple[str, str, Callable[[], tuple[float, float]]]] = [
            ("W1 overhead", "s end to end", lambda: w1(server)),
            ("W2 work", "s for 200 batches, all workers up", lambda: w2(server)),
            ("W3 big payload", "s end to end", lambda: w3(server)),
            ("W4 submit", "s until durable", lambda: w4(server)),
            ("cold start", "s POST to first predict", lambda: cold_start(server, folder)),
            ("log overhead", "s, 100k lines/s captured vs /dev/null", lambda: log_overhead(server)),
        ]
        if args.only:
            workloads = [w for w in workloads if w[0] in args.only]
        elif args.quick:
            workloads = [w for w in workloads if w[0] in ("W1 overhead", "W4 submit", "cold start")]
        for name, unit, measure in workloads:
            ours, lim = median_of(runs, measure)
            results["workloads"][name] = {"ours": ours, "limit": lim, "unit": unit}
            print(
                f"{name:16} ours {ours:8.3f}  limit {lim:8.3f}  ratio {ours / lim:6.2f}  ({unit})"
            )
        if W4_MEMORY:
            results["w4_server_growth_mb"] = statistics.median(W4_MEMORY)
        if W3_RSS_AFTER:
            results["w3_rss_after_mb"] = statistics.median(W3_RSS_AFTER)
        results["status_under_load"] = status_under_load(server)
        results["worker_rss_mb"] = worker_rss(server)
        results["log_latency"] = log_latency(server)
        results["idle_server_rss_after_mb"] = server.rss_mb()
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
    if not args.only or "big file" in args.only:  # a server of its own, with a data root
        results["big_file"] = bigfile.measure(0.25 if args.quick else 2.0)
        print("\n".join(bigfile.report(results["big_file"])))
    print(json.dumps({k: v for k, v in results.items() if k != "workloads"}, indent=2))
    print("\n".join(target_lines(results)))
    if RESULTS.exists():
        previous = json.loads(RESULTS.read_text())
        for name, now in results["workloads"].items():
            before = previous.get("workloads", {}).get(name)
            if before:
                print(f"{name:16} was {before['ours']:8.3f}  now {now['ours']:8.3f}")
    if args.only:
        return  # a partial run: nothing to record
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_readme:
        write_table(results)


def write_table(results: dict[str, Any]) -> None:
    rows = ["| workload | ours (median) | limit (median) | ratio | unit |", "|---|---|---|---|---|"]
    for name, r in results["workloads"].items():
        rows.append(
            f"| {name} | {r['ours']:.3f} | {r['limit']:.3f} | {r['ours'] / r['limit']:.2f} "
            f"| {r['unit']} |"
        )
    status = results["status_under_load"]
    latency = results["log_latency"]
    extra = [
        "",
        f"- status `GET /<api>?jobID=` at 200/s during W1: p50 {status['p50_ms']:.1f} ms, "
        f"p99 {status['p99_ms']:.1f} ms ({status['requests']} requests)",
        f"- W4 server memory growth: {results.get('w4_server_growth_mb', float('nan')):.0f} MB",
        f"- idle server RSS: {results['idle_server_rss_mb']:.0f} MB at start, "
        f"{results['idle_server_rss_after_mb']:.0f} MB after the run",
        f"- worker RSS with a predictor that imports nothing: {results['worker_rss_mb']:.0f} MB",
        f"- a print to a log follower (a line every 50 ms): p50 {latency['p50_ms']:.0f} ms, "
        f"max {latency['max_ms']:.0f} ms ({latency['lines']} lines)",
        *(f"- {line}" for line in bigfile.report(results["big_file"]) if "big_file" in results),
        *(f"- {line}" for line in target_lines(results)),
        f"- machine: {results['machine']}; {results['runs']} run(s) each, {results['date']}",
    ]
    table = "\n".join([START, *rows, *extra, END])
    text = README.read_text() if README.exists() else "# Benchmarks\n\n" + START + "\n" + END + "\n"
    if START not in text:
        text += "\n## Overhead\n\n" + START + "\n" + END + "\n"
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    README.write_text(before + table + after)


if __name__ == "__main__":
    main()
