"""The worker API: how workers lease batches and report results, with a job-scoped token.

Every request but the spec read and heartbeats carries `seq`, the worker's number for it (see
`cortex.store.protocol`): a request sent again after its answer was lost gets the same answer,
and nothing is done twice. Errors a worker must tell apart: 401 and 403 (the token is refused,
or the job does not exist) and 404 `batchapi.job_not_found` (it was deleted meanwhile) mean the
job is gone; any other 4xx is a failure the worker reports.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
import pydantic
from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from cortex import errors, exactjson
from cortex.api import auth, deps
from cortex.api.body import read_body, validation_message
from cortex.api.metrics import Metrics, MetricsDep
from cortex.jobs import WorkerState
from cortex.service import Service
from cortex.store.records import BatchResult
from cortex.store.tokens import WorkerJob
from cortex.worker import ranges
from cortex.worker import results as worker_results

router = APIRouter(prefix="/worker/v1/jobs/{job_id}", include_in_schema=False)
ServiceDep = Annotated[Service, Depends(deps.service)]


async def _job(request: Request) -> WorkerJob:
    """The job whose token the request carries: checked by the gate (`api.auth`) before the
    body was read, which a dependency here would come after."""
    job: WorkerJob | None = request.scope.get(auth.WORKER_JOB)
    if job is None:
        raise errors.Unauthorized("a worker token is required (Authorization: Bearer <token>)")
    return job


JobDep = Annotated[WorkerJob, Depends(_job)]


# The worker's number for a request: unique and growing per worker and channel.
Seq = Annotated[int | None, pydantic.Field(ge=0, lt=1 << 63)]


class StateBody(pydantic.BaseModel):
    worker_id: str = pydantic.Field(max_length=128)
    seq: Seq = None
    state: Literal["initializing", "running", "failed"]
    pid: int | None = None
    has_hook: bool | None = None
    error: str | None = None
    traceback: str | None = None


class ResultBody(pydantic.BaseModel):
    batch_id: str
    ok: bool
    duration_s: float = 0.0
    error: str | None = None
    traceback: str | None = None
    # Why the attempt failed (`cortex.worker.results.KINDS`); anything else is predict_error.
    error_kind: str | None = None
    # What predict returned, as the batch's JSON lines (`cortex.worker.results.lines`).
    lines: str | None = None

    def record(self) -> BatchResult:
        """The result as the store applies it; results over the limit fail the batch here
        too (the worker checks first)."""
        kind = self.error_kind if self.error_kind in worker_results.KINDS else "predict_error"
        if self.ok and self.lines is not None and len(self.lines) > worker_results.MAX_RESULT_BYTES:
            message = (
                f"the batch's results are {len(self.lines)} characters, more than the limit of "
                f"{worker_results.MAX_RESULT_BYTES} bytes per batch"
            )
            return BatchResult(
                self.batch_id, False, self.duration_s, message, None, "result_too_large"
            )
        lines = self.lines if self.ok else None
        return BatchResult(
            self.batch_id, self.ok, self.duration_s, self.error, self.traceback, kind, lines
        )


class LeaseBody(pydantic.BaseModel):
    worker_id: str = pydantic.Field(max_length=128)
    seq: Seq = None
    results: list[ResultBody] = []
    max_batches: int = 1
    # Only report: keep holding the other leased batches (see `QueueStore.lease`).
    hold: bool = False
    # The worker's last report before it exits: give back what it did not start.
    leaving: bool = False


class WorkerBody(pydantic.BaseModel):
    worker_id: str = pydantic.Field(max_length=128)


class HookBody(pydantic.BaseModel):
    worker_id: str = pydantic.Field(max_length=128)
    seq: Seq = None
    error: str | None = None
    traceback: str | None = None


def _own_worker(job: WorkerJob, worker_id: str) -> None:
    if not worker_id.startswith(f"{job.job_id}-"):
        raise errors.Forbidden(f"worker {worker_id} does not belong to job {job.job_id}")


@router.get("/spec")
def spec(job: JobDep, service: ServiceDep) -> dict[str, Any]:
    return service.workers.worker_spec(job)


@router.post("/state")
def state(body: StateBody, job: JobDep, service: ServiceDep) -> dict[str, bool]:
    _own_worker(job, body.worker_id)
    service.workers.worker_state(
        job,
        body.worker_id,
        WorkerState(body.state),
        seq=body.seq,
        pid=body.pid,
        has_hook=body.has_hook,
        error=body.error,
        traceback=body.traceback,
    )
    return {"ok": True}


@router.post("/lease")
async def lease(
    request: Request, job: JobDep, service: ServiceDep, metrics: MetricsDep
) -> Response:
    """The body (up to a thousand results) is read here, and parsed and checked in the thread
    pool with the rest of the work: parsed by FastAPI, on the event loop, it held every other
    request (status reads included) for a few milliseconds a lease."""
    raw = await read_body(request, service.settings.max_body_bytes)
    return await run_in_threadpool(_lease, raw, job, service, metrics)


def _lease(raw: bytes, job: WorkerJob, service: Service, metrics: Metrics) -> Response:
    try:
        body = LeaseBody.model_validate_json(raw)
    except pydantic.ValidationError as err:
        raise errors.InvalidRequest(validation_message(err.errors())) from None
    _own_worker(job, body.worker_id)
    results = [r.record() for r in body.results]
    leased = service.workers.lease(
        job, body.worker_id, results, body.max_batches, body.seq, body.hold, body.leaving
    )
    metrics.observe_results(job.api_name, results)
    # Payloads are stored as JSON text: splice their bytes in rather than parse and re-encode.
    # A batch stored by reference goes as `payload_ref`: the worker reads its lines itself.
    parts = [b'{"batches":[']
    for i, b in enumerate(leased.batches):
        head = orjson.dumps({"batch_id": b.batch_id, "attempt": b.attempt})
        key = b',"payload_ref":' if ranges.is_ref(b.payload) else b',"payload":'
        parts += [b"," if i else b"", head[:-1], key, b.payload, b"}"]
    parts.append(b'],"run_hook":%s,"done":%s' % (_BOOL[leased.run_hook], _BOOL[leased.done]))
    if leased.run_hook:  # what on_job_complete(job_summary) is told
        parts.append(b',"job_summary":' + exactjson.dumps(service.workers.summary(job)))
    parts.append(b"}")
    return Response(b"".join(parts), media_type="application/json")


_BOOL = {True: b"true", False: b"false"}


class PayloadBody(pydantic.BaseModel):
    worker_id: str = pydantic.Field(max_length=128)
    batch_id: str = pydantic.Field(max_length=64)


@router.post("/payload")
def payload(body: PayloadBody, job: JobDep, service: ServiceDep) -> Response:
    """A batch's payload read by the server: for a worker that cannot read the files of a
    batch stored by reference itself (no fsspec or credentials in its environment, a local
    file not on its machine). `{"payload": [...]}`, or `{"error": "..."}` when the data
    cannot be given as scanned (the file changed): the worker fails the batch with it."""
    _own_worker(job, body.worker_id)
    stored = service.workers.stored_payload(job, body.batch_id)
    try:
        data = ranges.stored_payload(stored)
    except ranges.Unreadable as err:
        return Response(orjson.dumps({"error": str(err)}), media_type="application/json")
    return Response(b'{"payload":' + data + b"}", media_type="application/json")


class HeartbeatReply(pydantic.BaseModel):
    ok: bool = pydantic.Field(description="False once the job has ended.")
    drain: bool = pydantic.Field(
        False,
        description="The worker should finish the batch it is running, report it, and exit "
        "without starting the other batches it holds (they go back to the queue unused): its "
        "capacity goes to a job of higher priority, or its job needs fewer workers.",
    )


@router.post("/heartbeat")
def heartbeat(body: WorkerBody, job: JobDep, service: ServiceDep) -> HeartbeatReply:
    _own_worker(job, body.worker_id)
    ok = service.workers.heartbeat(job, body.worker_id)
    return HeartbeatReply(ok=ok, drain=ok and service.workers.draining(body.worker_id))


_STREAMS = frozenset({"stdout", "stderr", "log"})
# An entry may hold many lines (the worker joins a run of prints); this bounds one entry.
_MAX_LINE_CHARS = 4 << 20


@router.post("/logs")
async def logs(request: Request, job: JobDep, service: ServiceDep) -> dict[str, int]:
    """Lines a worker captured: `{worker_id, seq, lines: [[ts, stream, level, batch_id,
    message]], dropped}`. Thousands of lines a request: checked cheaply, stored in chunks
    within the job's log budget, once however often the same shipment (`seq`) is sent.
    Parsing and storing run in the thread pool: a worker printing as fast as it can must not
    hold the event loop that answers everyone else."""
    raw = await read_body(request, service.settings.max_body_bytes)
    stored = await run_in_threadpool(_store_lines, service, job, raw)
    return {"stored": stored}


def _store_lines(service: Service, job: WorkerJob, raw: bytes) -> int:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise errors.InvalidRequest(f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict) or not isinstance(body.get("worker_id"), str):
        raise errors.InvalidRequest("worker_id: required")
    worker_id = body["worker_id"]
    _own_worker(job, worker_id)
    seq = body.get("seq")
    if seq is not None and (type(seq) is not int or not 0 <= seq < 1 << 63):
        raise errors.InvalidRequest("seq: must be a whole number from 0 to 2**63 - 1")
    lines = body.get("lines") or []
    if not isinstance(lines, list):
        raise errors.InvalidRequest(_LINE_SHAPE)
    for line in lines:
        if (
            not isinstance(line, list)
            or len(line) != 5
            or not isinstance(line[0], int | float)
            or line[1] not in _STREAMS
            or not isinstance(line[4], str)
            or not (line[2] is None or isinstance(line[2], str))
            or not (line[3] is None or isinstance(line[3], str))
        ):
            raise errors.InvalidRequest(_LINE_SHAPE)
        if len(line[4]) > _MAX_LINE_CHARS:
            line[4] = line[4][:_MAX_LINE_CHARS] + " [line cut]"
    dropped = body.get("dropped") or 0
    if not isinstance(dropped, int):
        dropped = 0
    return service.workers.ship_logs(job, worker_id, lines, dropped, seq)


_LINE_SHAPE = "lines: each line is [ts, stream, level, batch_id, message]"


@router.post("/hook")
def hook(body: HookBody, job: JobDep, service: ServiceDep) -> dict[str, str]:
    _own_worker(job, body.worker_id)
    status = service.workers.finish_hook(job, body.worker_id, body.error, body.traceback, body.seq)
    return {"status": status.value}
