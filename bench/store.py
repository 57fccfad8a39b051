"""The store's own cost on its two hot paths, in process, without HTTP or workers.

- lease: one job of 2,000 small batches and 2 workers, leased 256 at a time (the first lease
  of each worker takes 1, as a worker's first request does) and reported as succeeded with a
  result line each, every request numbered (`seq`), until both workers are told the job is
  done: the store's `lease` calls, wall and CPU time of this process.
- insert: 10,000 batches of 100 items (W4's 1,000,000 items) written by `append_batches` in
  the enqueuer's chunks of 2,000, an enqueuing job each run.

Each is run `--runs` times on fresh jobs in one store and the median printed, in ms:

    .venv/bin/python bench/store.py [--store postgresql://postgres@127.0.0.1:5432/DB] [--runs 7]

Without --store it uses a SQLite file in a temporary folder. With a PostgreSQL URL the
database must exist; it is migrated, and the jobs it adds are left there.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid

import orjson

from cortex.jobs import new_worker_id
from cortex.store import Store, schema
from cortex.store.records import BatchResult

_BATCHES = 2000
_INSERT_BATCHES = 10_000
_INSERT_CHUNK = 2000


def _job(store: Store, batches: int, workers: int) -> tuple[str, list[str]]:
    job_id = uuid.uuid4().hex
    payloads = [orjson.dumps(list(range(i * 10, i * 10 + 10))).decode() for i in range(batches)]
    store.create_job(
        job_id=job_id,
        api_name="bench",
        workers=workers,
        config=None,
        timeout_s=None,
        max_attempts=1,
        worker_token="t",
        payloads=payloads,
        replica_id="r1",
    )
    return job_id, [new_worker_id(job_id, n) for n in range(workers)]


def lease_run(store: Store) -> tuple[float, float, int]:
    """Wall and CPU seconds of one job's leases and reports, and how many requests."""
    job_id, workers = _job(store, _BATCHES, 2)
    held: dict[str, list] = {w: [] for w in workers}
    seq = dict.fromkeys(workers, 0)
    active, requests = list(workers), 0
    wall, cpu = time.perf_counter(), time.process_time()
    while active:
        for worker in list(active):
            results = [
                BatchResult(
                    batch_id=b.batch_id,
                    ok=True,
                    duration_s=1e-5,
                    lines=f'{{"batch_id":"{b.batch_id}","index":0,"result":45}}\n',
                )
                for b in held[worker]
            ]
            seq[worker] += 1
            answer = store.lease(
                job_id, worker, results, 256 if seq[worker] > 1 else 1, 60.0, seq[worker]
            )
            requests += 1
            held[worker] = answer.batches
            if not answer.batches and (answer.done or not results):
                active.remove(worker)
    return time.perf_counter() - wall, time.process_time() - cpu, requests


def insert_run(store: Store) -> tuple[float, float]:
    """Wall and CPU seconds of writing 10,000 batches with `append_batches`."""
    job_id = uuid.uuid4().hex
    store.create_enqueuing_job(
        job_id=job_id,
        api_name="bench",
        workers=1,
        config=None,
        timeout_s=None,
        max_attempts=1,
        worker_token="t",
        dataset={"kind": "item_list"},
        replica_id="r1",
    )
    items = list(range(100))
    payloads = [orjson.dumps([i, *items]).decode() for i in range(_INSERT_BATCHES)]
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, _INSERT_BATCHES, _INSERT_CHUNK):
        chunk = payloads[start : start + _INSERT_CHUNK]
        assert store.append_batches(job_id, chunk, 100 * len(chunk), "r1") is not None
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a store URL (default: a new SQLite file)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--only", choices=["lease", "insert"])
    args = parser.parse_args()
    url = args.store or f"sqlite:///{tempfile.mkdtemp()}/cortex.db"
    store = Store(url)
    schema.upgrade(store)
    spec = {"name": "bench", "kind": "BatchAPI", "predictor": {"config": {}}}
    store.put_api("bench", uuid.uuid4().hex, spec, b"a")
    if args.only != "insert":
        runs = [lease_run(store) for _ in range(args.runs)]
        wall = statistics.median(r[0] for r in runs) * 1000
        cpu = statistics.median(r[1] for r in runs) * 1000
        print(
            f"lease   {wall:7.1f} ms wall {cpu:7.1f} ms CPU  "
            f"({_BATCHES} batches, {runs[0][2]} requests; median of {args.runs})"
        )
    if args.only != "lease":
        inserts = [insert_run(store) for _ in range(args.runs)]
        wall = statistics.median(r[0] for r in inserts) * 1000
        cpu = statistics.median(r[1] for r in inserts) * 1000
        print(
            f"insert  {wall:7.1f} ms wall {cpu:7.1f} ms CPU  "
            f"({_INSERT_BATCHES} batches; median of {args.runs})"
        )
    store.close()


if __name__ == "__main__":
    main()
