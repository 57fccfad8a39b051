"""The worker protocol straight on the store: `StoreQueue`, the second adapter of the worker's
`WorkerQueue` beside `HttpQueue`, so that the real worker loop runs against a store with no
server in between (the contract suite runs it on both engines, faults included).

It does with a request what the worker API does, less HTTP: the same store methods with the
worker's sequence numbers, the same answers, and the same three outcomes a worker tells apart
(answered; the job is gone; refused). It imports the worker's interface, which is standard
library only; the worker runtime never imports this module.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from cortex import errors
from cortex.jobs import WorkerState
from cortex.store.records import BatchResult
from cortex.store.sql import Store
from cortex.worker import queue, ranges


class StoreQueue(queue.WorkerQueue):
    """One worker's requests, acted on by `store` in this process.

    `info` is what the worker API's spec read answers (the server builds it from the job and
    its API: see `WorkerApi.worker_spec`); `lease_s` and `max_lease_batches` are the server's
    settings of those names.
    """

    def __init__(
        self,
        store: Store,
        job_id: str,
        worker_id: str,
        info: dict[str, Any],
        *,
        lease_s: float = 30.0,
        max_lease_batches: int = 256,
        retry_s: float = 120.0,
    ) -> None:
        super().__init__(worker_id, retry_s)
        self.store = store
        self.job_id = job_id
        self.info = info
        self.lease_s = lease_s
        self.max_lease_batches = max_lease_batches

    def _send(self, op: str, body: dict[str, Any] | None) -> Any:
        try:
            return self._act(op, body or {})
        except errors.JobMissing as err:
            raise queue.JobGone(f"404 {err.kind}: {err.message}") from None
        except errors.CortexError as err:
            if err.status_code in (401, 403):
                raise queue.JobGone(f"{err.status_code} {err.kind}: {err.message}") from None
            if err.status_code >= 500:
                raise queue.Unavailable(err.message) from None
            raise queue.Refused(err.status_code, err.kind, err.message) from None
        except sa.exc.OperationalError as err:  # the database is away, or busy: try again
            raise queue.Unavailable(f"the store failed: {err.orig}") from None

    def _act(self, op: str, body: dict[str, Any]) -> Any:
        store, job_id, worker_id = self.store, self.job_id, self.worker_id
        seq = body.get("seq")
        if op == "spec":
            if store.get_job(job_id) is None:
                raise errors.JobMissing(job_id)
            return json.loads(json.dumps(self.info))  # a copy, as if it came over the wire
        if op == "state":
            store.report_state(
                job_id,
                worker_id,
                WorkerState(body["state"]),
                seq=seq,
                pid=body.get("pid"),
                has_hook=body.get("has_hook"),
                error=body.get("error"),
                traceback=body.get("traceback"),
            )
            return {"ok": True}
        if op == "lease":
            results = [
                BatchResult(
                    r["batch_id"],
                    r["ok"],
                    r.get("duration_s", 0.0),
                    r.get("error"),
                    r.get("traceback"),
                    r.get("error_kind") or "predict_error",
                    r.get("lines") if r["ok"] else None,
                )
                for r in body["results"]
            ]
            max_batches = max(0, min(body["max_batches"], self.max_lease_batches))
            leased = store.lease(
                job_id,
                worker_id,
                results,
                max_batches,
                self.lease_s,
                seq,
                hold=bool(body.get("hold")) and not max_batches,
                leaving=bool(body.get("leaving")),
            )
            batches = [
                {
                    "batch_id": b.batch_id,
                    "attempt": b.attempt,
                    ("payload_ref" if ranges.is_ref(b.payload) else "payload"): json.loads(
                        b.payload
                    ),
                }
                for b in leased.batches
            ]
            self.last_response_bytes = sum(len(b.payload) for b in leased.batches)
            answer = {"batches": batches, "run_hook": leased.run_hook, "done": leased.done}
            if leased.run_hook:
                answer["job_summary"] = store.summary(job_id)
            return answer
        if op == "payload":
            held = store.stored_payload(job_id, body["batch_id"])
            if held is None:
                raise errors.NotFound(f"batch {body['batch_id']} has no stored payload")
            try:
                return {"payload": json.loads(ranges.stored_payload(held))}
            except ranges.Unreadable as err:
                return {"error": str(err)}
        if op == "heartbeat":
            return {"ok": store.heartbeat(job_id, worker_id, self.lease_s)}
        if op == "logs":
            stored = store.ship_logs(job_id, worker_id, body["lines"], body["dropped"], seq)
            return {"stored": stored}
        if op == "hook":
            hook = store.finish_hook(job_id, worker_id, body["error"], body["traceback"], seq)
            return {"status": hook.status.value}
        raise ValueError(f"no such request: {op}")
