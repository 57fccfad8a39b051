"""A worker's loop against the store directly, for the concurrency tests (a module of its own
so that processes started with `spawn` can import it)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from cortex.store import Store
from cortex.store.records import BatchResult


@dataclasses.dataclass
class Record:
    leased: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    hooks: list[str] = dataclasses.field(default_factory=list)
    errors: list[BaseException] = dataclasses.field(default_factory=list)


def work(store: Store, job_id: str, worker: str, record: Record, start: Any) -> None:
    """A worker's loop, as cortex.worker.runtime runs it, against the store directly."""
    try:
        start.wait()
        results: list[BatchResult] = []
        while True:
            reply = store.lease(job_id, worker, results, 3, 30)
            results = []
            if reply.run_hook:
                record.hooks.append(worker)
                store.finish_hook(job_id, worker, None, None)
                return
            if not reply.batches:
                if reply.done:
                    return
                time.sleep(0.002)  # the worker's poll while others hold the last batches
                continue
            for batch in reply.batches:
                record.leased.append((batch.batch_id, batch.attempt, worker))
                flaky = b'"flaky"' in batch.payload and batch.attempt == 1
                results.append(BatchResult(batch.batch_id, not flaky, 0.001, "flaky", None))
    except BaseException as err:  # reported by the test, not lost in a thread
        record.errors.append(err)


def run_in_process(url: str, job_id: str, worker: str, out: Any, start: Any) -> None:
    store = Store(url)
    record = Record()
    work(store, job_id, worker, record, start)
    out.put((record.leased, record.hooks, [repr(e) for e in record.errors]))
    store.close()
