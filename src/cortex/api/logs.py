"""The job log routes: `GET /<api>/logs?jobID=` (and `/<api>/<job_id>/logs`)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from cortex import errors, logs
from cortex.api import deps
from cortex.service import Service
from cortex.store.logs import LogFilter

router = APIRouter()
ServiceDep = Annotated[Service, Depends(deps.service)]


def _stream(
    service: Service,
    api_name: str,
    job_id: str,
    follow: bool,
    since: str | None,
    tail: int | None,
    worker: str | None,
    batch: str | None,
    fmt: str,
) -> StreamingResponse:
    job = service.get_job(api_name, job_id)
    where = LogFilter(
        since_ts=logs.parse_since(since) if since else None,
        source=logs.worker_source(job_id, worker) if worker else None,
        batch_id=batch,
    )

    def finished() -> bool:
        current = service.store.get_job(job_id)
        if current is None or not current.status.terminal:
            return False
        return not any(w.state.alive for w in service.store.list_workers(job_id))

    formatter = logs.format_json if fmt == "json" else logs.format_text
    media = "application/x-ndjson" if fmt == "json" else "text/plain; charset=utf-8"
    return StreamingResponse(
        logs.stream_lines(
            service.logs,
            job,
            where=where,
            tail=tail,
            follow=follow,
            finished=finished,
            fmt=formatter,
        ),
        media_type=media,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


Follow = Annotated[bool, Query(description="keep streaming until the job ends")]
Since = Annotated[str | None, Query(description="30s, 5m, 2h, 1d, or an RFC 3339 time")]
Tail = Annotated[int | None, Query(ge=0, le=1_000_000, description="only the last N lines")]
Worker = Annotated[str | None, Query(description="one worker: 0, worker-0, or server")]
Batch = Annotated[str | None, Query(max_length=64, description="one batch id")]
Format = Annotated[Literal["text", "json"], Query(description="text lines or JSON lines")]


@router.get("/{api_name}/logs", response_class=StreamingResponse)
def job_logs(
    api_name: str,
    service: ServiceDep,
    job_id: Annotated[str | None, Query(alias="jobID")] = None,
    follow: Follow = False,
    since: Since = None,
    tail: Tail = None,
    worker: Worker = None,
    batch: Batch = None,
    format: Format = "text",
) -> StreamingResponse:
    if job_id is None:
        service.get_api(api_name)
        raise errors.InvalidRequest(
            "job id is required to stream logs of a batch api: /<api>/logs?jobID=<id>",
            kind="endpoints.logs_job_id_required",
        )
    return _stream(service, api_name, job_id, follow, since, tail, worker, batch, format)


@router.get("/{api_name}/{job_id}/logs", response_class=StreamingResponse)
def job_logs_by_path(
    api_name: str,
    job_id: str,
    service: ServiceDep,
    follow: Follow = False,
    since: Since = None,
    tail: Tail = None,
    worker: Worker = None,
    batch: Batch = None,
    format: Format = "text",
) -> StreamingResponse:
    return _stream(service, api_name, job_id, follow, since, tail, worker, batch, format)
