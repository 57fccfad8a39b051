"""The real worker loop (`cortex.worker.runtime.work`) on the store, through its store adapter
`StoreQueue`, for the contract tests (a module of its own so that processes started with
`spawn` can import it).

The predictor fails a batch whose payload starts with "flaky" on its first attempt, so batches
also come back to the queue; the queue notes every batch attempt it is answered with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cortex import predictor as predictor_mod
from cortex.store import Store
from cortex.store.workerqueue import StoreQueue
from cortex.worker import runtime


@dataclasses.dataclass
class Record:
    leased: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    hooks: list[str] = dataclasses.field(default_factory=list)
    errors: list[BaseException] = dataclasses.field(default_factory=list)
    codes: list[int] = dataclasses.field(default_factory=list)


class RecordingQueue(StoreQueue):
    """A worker's store adapter that notes the batch attempts it is given."""

    def __init__(self, store: Store, job_id: str, worker_id: str, record: Record) -> None:
        super().__init__(store, job_id, worker_id, {}, max_lease_batches=3)
        self.record = record
        self.attempts: dict[str, int] = {}

    def lease(self, results: list[dict[str, Any]], max_batches: int) -> dict[str, Any]:
        reply = super().lease(results, max_batches)
        for batch in reply["batches"]:
            self.attempts[batch["batch_id"]] = batch["attempt"]
            self.record.leased.append((batch["batch_id"], batch["attempt"], self.worker_id))
        return reply


class FlakyPredictor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.queue: RecordingQueue = config["queue"]

    def predict(self, payload: Any, batch_id: str) -> None:
        if payload[0] == "flaky" and self.queue.attempts[batch_id] == 1:
            raise ValueError("flaky")

    def on_job_complete(self) -> None:
        self.queue.record.hooks.append(self.queue.worker_id)


def work(store: Store, job_id: str, worker: str, record: Record, start: Any) -> None:
    """One worker: the runtime's loop, on the store."""
    try:
        queue = RecordingQueue(store, job_id, worker, record)
        predictor = predictor_mod.Predictor(FlakyPredictor, {"queue": queue}, {})
        start.wait()
        record.codes.append(runtime.work(queue, predictor))
    except BaseException as err:  # reported by the test, not lost in a thread
        record.errors.append(err)


def run_in_process(url: str, job_id: str, worker: str, out: Any, start: Any) -> None:
    store = Store(url)
    record = Record()
    work(store, job_id, worker, record, start)
    out.put((record.leased, record.hooks, [repr(e) for e in record.errors]))
    store.close()
