"""A job's collected results: what `predict` returned, as JSON lines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from cortex.api import deps
from cortex.api.public import ErrorBody
from cortex.service import Service

router = APIRouter(
    responses={"4XX": {"model": ErrorBody, "description": "The request was refused"}}
)
ServiceDep = Annotated[Service, Depends(deps.service)]

_RESULTS_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "JSON lines, one per result, batch by batch in the job's order: "
            '`{"batch_id", "index", "result"}`. A batch whose `predict` returned a list as '
            "long as its payload has a line per item (`index`: the item's place in the "
            "batch); any other value is one line with `index` null. Batches whose `predict` "
            "returned None, and failed batches, have none (see `failed_batches`)."
        ),
        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/{api_name}/{job_id}/results",
    response_class=StreamingResponse,
    responses=_RESULTS_DOC,
)
async def job_results(api_name: str, job_id: str, service: ServiceDep) -> StreamingResponse:
    """The results collected so far (all of them once the job has ended), streamed: the
    server holds a few batches' results at a time whatever the job's size."""
    job = await run_in_threadpool(service.lifecycle.get_job, api_name, job_id)
    pages: Iterator[str] = service.store.result_pages(job.job_id)
    return StreamingResponse(pages, media_type="application/x-ndjson")
