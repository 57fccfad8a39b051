"""The job log routes: `GET /<api>/logs?jobID=` (and `/<api>/<job_id>/logs`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from cortex import errors, logs
from cortex.api import deps
from cortex.service import Service
from cortex.store.logs import LogFilter

router = APIRouter()
ServiceDep = Annotated[Service, Depends(deps.service)]
Pages = AsyncGenerator[list[str], None]

JobID = Annotated[str | None, Query(alias="jobID")]
Follow = Annotated[bool, Query(description="keep streaming until the job ends")]
Since = Annotated[str | None, Query(description="30s, 5m, 2h, 1d, or an RFC 3339 time")]
Tail = Annotated[int | None, Query(ge=0, le=1_000_000, description="only the last N lines")]
Worker = Annotated[str | None, Query(description="one worker: 0, worker-0, or server")]
Batch = Annotated[str | None, Query(max_length=64, description="one batch id")]
Format = Annotated[Literal["text", "json"], Query(description="text lines or JSON lines")]


@dataclasses.dataclass(frozen=True)
class Options:
    """What to read of a job's log and how to write it, the same for every route."""

    since: str | None
    tail: int | None
    worker: str | None
    batch: str | None
    format: Literal["text", "json"]


def _options(
    since: Since = None,
    tail: Tail = None,
    worker: Worker = None,
    batch: Batch = None,
    format: Format = "text",
) -> Options:
    return Options(since, tail, worker, batch, format)


OptionsDep = Annotated[Options, Depends(_options)]


def _open(
    service: Service, api_name: str, job_id: str | None, follow: bool, options: Options
) -> Pages:
    """Check the job and the options (any error is raised here, before a byte is sent), then
    the job's formatted lines, a page at a time: one place for every log route."""
    if job_id is None:
        service.get_api(api_name)
        raise errors.InvalidRequest(
            "job id is required to stream logs of a batch api: /<api>/logs?jobID=<id>",
            kind="endpoints.logs_job_id_required",
        )
    job = service.get_job(api_name, job_id)
    where = LogFilter(
        since_ts=logs.parse_since(options.since) if options.since else None,
        source=logs.worker_source(job_id, options.worker) if options.worker else None,
        batch_id=options.batch,
    )

    def finished() -> bool:
        current = service.store.get_job(job_id)
        if current is None or not current.status.terminal:
            return False
        return not any(w.state.alive for w in service.store.list_workers(job_id))

    return logs.stream_lines(
        service.logs,
        job,
        where=where,
        tail=options.tail,
        follow=follow,
        finished=finished,
        fmt=logs.format_json if options.format == "json" else logs.format_text,
    )


def _response(pages: Pages, options: Options) -> StreamingResponse:
    async def body() -> AsyncGenerator[str, None]:
        async with contextlib.aclosing(pages):
            async for page in pages:
                yield "".join(page)

    json_lines = options.format == "json"
    return StreamingResponse(
        body(),
        media_type="application/x-ndjson" if json_lines else "text/plain; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{api_name}/logs", response_class=StreamingResponse)
def job_logs(
    api_name: str,
    service: ServiceDep,
    options: OptionsDep,
    job_id: JobID = None,
    follow: Follow = False,
) -> StreamingResponse:
    return _response(_open(service, api_name, job_id, follow, options), options)


@router.get("/{api_name}/{job_id}/logs", response_class=StreamingResponse)
def job_logs_by_path(
    api_name: str,
    job_id: str,
    service: ServiceDep,
    options: OptionsDep,
    follow: Follow = False,
) -> StreamingResponse:
    return _response(_open(service, api_name, job_id, follow, options), options)
