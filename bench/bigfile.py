"""Benchmark: enqueuing one big JSON-lines file as `delimited_files` (batches by reference).

A file of about 1 kB lines (`--gb`, 2 by default; 0.25 with `--quick`) is submitted to a real
`cortex serve` (SQLite, local launcher, one worker with a predictor that does nothing) and
timed from the POST until enqueuing is done (the worker starts on the first batches meanwhile,
as it would in production). The store's growth is its database file's, measured after a
checkpoint of its write-ahead log (the log, reported beside it, is transient: the store
truncates it past 64 MiB whatever the dataset); the server's memory growth is its peak
resident set over its size before. Beside it, in the same run, the limit: reading the same
file once in 8 MiB blocks and counting its newlines, in one process (no scan can do less). It
reports against the targets (for a 2 GB file: enqueued within 10 s, the store grown by under
50 MB, the server's memory by under 100 MB) with met / not met.

    .venv/bin/python bench/bigfile.py [--gb 2] [--quick]

`bench/bench.py` runs it too (`make bench`: 2 GB; `make bench-quick`: 0.25 GB).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from datasets import PeakRss  # noqa: E402  (bench/datasets.py)

from cortex.client import Client  # noqa: E402
from helpers import start_server, stop_server  # noqa: E402

LINE_BYTES = 1000
BATCH_SIZE = 100
# The targets for a 2 GB file (bench/README.md): the time scales with the size, the store's and
# the server's growth stay as they are (a smaller file must not need more).
TARGET_S_PER_GB = 5.0
TARGET_STORE_MB = 50.0
TARGET_RSS_MB = 100.0


def write_file(path: Path, gb: float) -> int:
    """About `gb` GiB of JSON lines of about LINE_BYTES each; returns the line count."""
    pad = "x" * (LINE_BYTES - 30)
    count = int(gb * 2**30 / LINE_BYTES)
    with open(path, "w") as out:
        for start in range(0, count, 10_000):
            stop = min(count, start + 10_000)
            out.write("".join(f'{{"id": {n:>9}, "text": "{pad}"}}\n' for n in range(start, stop)))
    return count


def limit_s(path: Path) -> float:
    """Reading the file once and counting its newlines: the floor of any scan."""
    started = time.perf_counter()
    with open(path, "rb") as file:
        while block := file.read(8 << 20):
            block.count(b"\n")
    return time.perf_counter() - started


def _store_bytes(data_dir: Path) -> tuple[int, int]:
    """The database's size once its write-ahead log is checkpointed into it (what the store
    holds), and the log's size before that (transient: the store truncates it past 64 MiB)."""
    db_path = data_dir / "cortex.db"
    wal = db_path.with_name(db_path.name + "-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    with sqlite3.connect(db_path, timeout=30) as db:
        db.execute("PRAGMA wal_checkpoint(FULL)")
    return db_path.stat().st_size, wal_bytes


def measure(gb: float) -> dict[str, Any]:
    """Enqueue a `gb` GiB file once; the numbers, the targets and whether each was met."""
    with tempfile.TemporaryDirectory(prefix="cortex-bigfile-") as tmp:
        root = Path(tmp) / "files"
        root.mkdir()
        path = root / "big.jsonl"
        lines = write_file(path, gb)
        server_dir = Path(tmp) / "server"
        server = start_server(server_dir, CORTEX_DATA_ROOTS=str(root), CORTEX_LOG_LEVEL="warning")
        try:
            with Client(server.url, timeout_s=120) as client:
                client.deploy(HERE / "predictors" / "cortex.yaml")
                store_before, _ = _store_bytes(server_dir)
                rss = PeakRss(server.process.pid)
                started = time.perf_counter()
                body = {
                    "workers": 1,
                    "delimited_files": {"s3_paths": [str(path)], "batch_size": BATCH_SIZE},
                }
                job_id = client.submit("bench", body)["job_id"]
                while True:
                    status = client.get_job("bench", job_id)["job_status"]
                    if status["status"] != "status_enqueuing":
                        break
                    time.sleep(0.05)
                enqueue_s = time.perf_counter() - started
                rss_mb = rss.stop()[1]
                store_after, wal_bytes = _store_bytes(server_dir)
                store_mb = (store_after - store_before) / 2**20
                if status["status"] == "status_running":
                    client.stop_job("bench", job_id)
        finally:
            stop_server(server)
        floor_s = limit_s(path)
    size_gb = lines * LINE_BYTES / 2**30
    result = {
        "file_gb": round(size_gb, 2),
        "lines": lines,
        "status": status["status"],
        "batches": status["total_batch_count"],
        "enqueue_s": round(enqueue_s, 2),
        "limit_s": round(floor_s, 2),
        "ratio": round(enqueue_s / floor_s, 2),
        "items_per_s": round(lines / enqueue_s),
        "store_growth_mb": round(store_mb, 1),
        "wal_mb": round(wal_bytes / 2**20, 1),
        "server_rss_growth_mb": round(rss_mb, 1),
        "targets": {
            "enqueue_s": TARGET_S_PER_GB * size_gb,
            "store_growth_mb": TARGET_STORE_MB,
            "server_rss_growth_mb": TARGET_RSS_MB,
        },
    }
    result["met"] = {
        name: result[name] <= target and status["status"] != "status_enqueue_failed"
        for name, target in result["targets"].items()
    }
    return result


def report(result: dict[str, Any]) -> list[str]:
    """One line per target: measured, target, met or not; the limit beside the time."""
    lines = []
    for name, target in result["targets"].items():
        value = result[name]
        extra = f" (limit {result['limit_s']:.2f} s, ratio {result['ratio']:.2f})" * (
            name == "enqueue_s"
        )
        verdict = "met" if result["met"][name] else "NOT MET"
        lines.append(
            f"big file {result['file_gb']:g} GB {name:21} {value:8.2f}  target <= {target:7.2f}"
            f"  {verdict}{extra}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="a 0.25 GB file")
    args = parser.parse_args()
    result = measure(0.25 if args.quick else args.gb)
    print(json.dumps(result), flush=True)
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
