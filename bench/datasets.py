"""Benchmark: enqueuing file datasets through a real `cortex serve`.

Measures items enqueued per second (submission to `enqueue_done`, read from the job's
`total_batch_count` and status) and the server's peak memory (resident set size, sampled with
psutil every 20 ms) for:

- a JSON-lines file of N lines (default 1,000,000) as `delimited_files`;
- a folder of M small files (default 100,000) as `file_path_lister`;
- optionally a large JSON-lines file (`--big-gb 2`) to check that memory stays flat.

Workers are started with a predictor that does nothing, and the job is stopped as soon as
enqueuing is done, so only enqueuing is measured. Run:

    .venv/bin/python bench/datasets.py [--lines 1000000] [--files 100000] [--big-gb 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cortex.client import Client
from helpers import start_server, stop_server

PREDICTOR = """
class PythonPredictor:
    def __init__(self, config, job_spec=None):
        pass

    def predict(self, payload, batch_id=None):
        pass
"""


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.base / 2**20, (self.peak - self.base) / 2**20


def _deploy(client: Client, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictor.py").write_text(PREDICTOR)
    (folder / "cortex.yaml").write_text(
        "- name: bench\n  kind: BatchAPI\n  predictor:\n    type: python\n    path: predictor.py\n"
    )
    client.deploy(folder / "cortex.yaml")
    return "bench"


def _run(client: Client, server_pid: int, body: dict, items: int, label: str) -> dict:
    rss = PeakRss(server_pid)
    start = time.perf_counter()
    job_id = client.submit("bench", body)["job_id"]
    answered = time.perf_counter() - start
    while True:
        status = client.get_job("bench", job_id)["job_status"]
        if status["status"] != "status_enqueuing":
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    base_mb, growth_mb = rss.stop()
    if status["status"] == "status_running":
        client.stop_job("bench", job_id)
    result = {
        "dataset": label,
        "items": items,
        "batches": status["total_batch_count"],
        "status": status["status"],
        "submit_answer_s": round(answered, 3),
        "enqueue_s": round(elapsed, 2),
        "items_per_s": round(items / elapsed),
        "server_rss_before_mb": round(base_mb),
        "server_rss_growth_mb": round(growth_mb),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--big-gb", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cortex-bench-") as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        lines_path = root / "lines.jsonl"
        with open(lines_path, "w") as out:
            for start in range(0, args.lines, 100_000):
                stop = min(args.lines, start + 100_000)
                out.write(
                    "".join(
                        f'{{"id": {n}, "text": "item number {n}"}}\n' for n in range(start, stop)
                    )
                )
        files = root / "files"
        for n in range(args.files):
            sub = files / f"{n // 1000:03d}"
            if n % 1000 == 0:
                sub.mkdir(parents=True)
            (sub / f"{n:06d}.bin").touch()
        server = start_server(Path(tmp) / "server", CORTEX_DATA_ROOTS=str(root))
        try:
            with Client(server.url, timeout_s=120) as client:
                _deploy(client, Path(tmp) / "project")
                bs = args.batch_size
                if args.lines:
                    _run(
                        client,
                        server.process.pid,
                        {
                            "workers": 1,
                            "delimited_files": {"s3_paths": [str(lines_path)], "batch_size": bs},
                        },
                        args.lines,
                        f"delimited_files, {args.lines:,} lines",
                    )
                if args.files:
                    _run(
                        client,
                        server.process.pid,
                        {
                            "workers": 1,
                            "file_path_lister": {"s3_paths": [f"{files}/"], "batch_size": bs},
                        },
                        args.files,
                        f"file_path_lister, {args.files:,} files",
                    )
                if args.big_gb:
                    big = root / "big.jsonl"
                    line = json.dumps({"text": "x" * 1000}) + "\n"
                    count = int(args.big_gb * 2**30 / len(line))
                    block = line * 10_000
                    with open(big, "w") as out:
                        for _ in range(count // 10_000):
                            out.write(block)
                    _run(
                        client,
                        server.process.pid,
                        {
                            "workers": 1,
                            "delimited_files": {"s3_paths": [str(big)], "batch_size": bs},
                        },
                        count // 10_000 * 10_000,
                        f"delimited_files, {args.big_gb:g} GB file",
                    )
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
