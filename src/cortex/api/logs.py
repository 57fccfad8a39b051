"""The job log routes: `GET /<api>/logs?jobID=` (and `/<api>/<job_id>/logs`), and the
websockets the Cortex CLI opened, `/logs/<api>?jobID=` (v0.21) and `/logs/<api>/<job_id>` (v0.20).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Query, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.websockets import WebSocketDisconnect

from cortex import errors, logs
from cortex.api import deps
from cortex.service import Service
from cortex.store.logs import LogFilter

log = logging.getLogger("cortex.server")
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


async def _options(
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
    the job's formatted lines, a page at a time: one place for the HTTP and websocket routes."""
    if job_id is None:
        service.lifecycle.get_api(api_name)
        raise errors.InvalidRequest(
            "job id is required to stream logs of a batch api: /<api>/logs?jobID=<id>",
            kind="endpoints.logs_job_id_required",
        )
    job = service.lifecycle.get_job(api_name, job_id)
    where = LogFilter(
        since_ts=logs.parse_since(options.since) if options.since else None,
        source=logs.worker_source(job_id, options.worker) if options.worker else None,
        batch_id=options.batch,
    )

    def finished() -> bool:
        current = service.lifecycle.find_job(job_id)
        if current is None:
            return True  # deleted with its API, and its log with it: nothing more will come
        if not current.status.terminal:
            return False
        return not any(w.state.alive for w in service.lifecycle.workers(job_id))

    return logs.stream_lines(
        service.logs,
        job,
        where=where,
        tail=options.tail,
        follow=follow,
        finished=finished,
        fmt=logs.format_json if options.format == "json" else logs.format_text,
    )


# -- HTTP: the lines as one streamed body ---------------------------------------------------


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


# -- websocket: one text frame per line, as Cortex's operator sent them ---------------------
# A refused socket (unknown API or job, no jobID, a bad option) gets the HTTP route's error
# response instead of the handshake: see the error mapping in app.py.


@router.websocket("/logs/{api_name}")
async def job_logs_socket(
    websocket: WebSocket,
    api_name: str,
    service: ServiceDep,
    options: OptionsDep,
    job_id: JobID = None,
    follow: Follow = True,
) -> None:
    pages = await run_in_threadpool(_open, service, api_name, job_id, follow, options)
    await _send(websocket, pages, job_id)


@router.websocket("/logs/{api_name}/{job_id}")
async def job_logs_socket_by_path(
    websocket: WebSocket,
    api_name: str,
    job_id: str,
    service: ServiceDep,
    options: OptionsDep,
    follow: Follow = True,
) -> None:
    pages = await run_in_threadpool(_open, service, api_name, job_id, follow, options)
    await _send(websocket, pages, job_id)


async def _send(websocket: WebSocket, pages: Pages, job_id: str | None) -> None:
    """Accept, send each line as one text frame, and close with 1000 once the stream ends.

    A client that goes away cancels the stream at once: a follower that only noticed when its
    next send failed would poll the store until the job ended, even if it never logs again."""
    await websocket.accept()
    sent, how = 0, "the client left"
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, websocket, group.cancel_scope)
            async with contextlib.aclosing(pages):
                async for page in pages:
                    for line in page:
                        await websocket.send_text(line)
                        sent += 1
            await websocket.close(1000)
            how = "the stream ended"
            group.cancel_scope.cancel()
    except BaseExceptionGroup as wrapped:
        # The task group wraps what the stream raised; the app's error mapping wants the error
        # itself (it closes the socket with the message as reason).
        error = wrapped.exceptions[0] if len(wrapped.exceptions) == 1 else wrapped
        if isinstance(error, WebSocketDisconnect):
            return  # the client left during a send
        how = "an error"
        raise error from None
    finally:
        log.debug("log socket of job %s closed: %s after %d lines", job_id, how, sent)


async def _cancel_on_disconnect(websocket: WebSocket, scope: anyio.CancelScope) -> None:
    # Whatever the client sends is ignored; only its leaving matters.
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass
    scope.cancel()
