"""The public API: deploy, submit, status, stop, list (spec §4)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from cortex import errors, exactjson, hookspec, memory, schemas, views
from cortex.api import deps, submitdoc
from cortex.api.body import read_json
from cortex.project import MAX_ARCHIVE_BYTES
from cortex.service import Service
from cortex.store import Job
from cortex.store.sql import JobProgress


class ErrorBody(pydantic.BaseModel):
    """Every error answer: a machine-readable kind and a message for people."""

    model_config = pydantic.ConfigDict(extra="forbid")
    kind: str = pydantic.Field(examples=["batchapi.invalid_workers"])
    message: str = pydantic.Field(examples=["workers: must be at least 1"])


# Errors are {"kind", "message"} with a 4xx status (the spec's are all 400), never FastAPI's
# default 422 body: declaring "4XX" also keeps FastAPI from documenting that 422.
router = APIRouter(
    responses={"4XX": {"model": ErrorBody, "description": "The request was refused"}}
)
ServiceDep = Annotated[Service, Depends(deps.service)]
BaseUrl = Annotated[str, Depends(deps.base_url)]
# The spec's job list holds every in-progress job, topped up with the newest others to 10.
_JOBS_PER_API = 10


def status_json(service: Service, job: Job, base_url: str) -> dict[str, Any]:
    progress = service.lifecycle.job_progress(job.job_id)
    if progress is None:  # deleted since it was listed
        raise errors.JobNotFound(job.api_name, job.job_id)
    return _status_json(service, progress, base_url)


def _status_json(service: Service, progress: JobProgress, base_url: str) -> dict[str, Any]:
    job = progress[0]
    deliveries = service.lifecycle.webhook_deliveries(job) if job.webhook else None
    return views.status_json(progress, service.lifecycle.api_spec_for(job), base_url, deliveries)


async def _job_status(service: Service, api_name: str, job_id: str, base_url: str) -> Response:
    """The status route's work: read inline on SQLite (see `deps.read`), one connection."""

    def read() -> dict[str, Any]:
        progress = service.lifecycle.job_progress(job_id)
        if progress is None or progress[0].api_name != api_name:
            service.lifecycle.get_job(api_name, job_id)  # raises the error to report
            raise errors.JobNotFound(api_name, job_id)  # (deleted in between)
        return _status_json(service, progress, base_url)

    return _json(await deps.read(service, read))


def _api_summary(service: Service, name: str, base_url: str, limit: int) -> dict[str, Any]:
    api = service.lifecycle.get_api(name)
    jobs = service.lifecycle.list_jobs(name, limit)
    return {
        **views.api_json(api, base_url),
        # Additive: the environment of the latest deploy (building, ready, failed, none).
        "environment": service.deploys.api_environment(api),
        "job_statuses": [status_json(service, job, base_url)["job_status"] for job in jobs],
    }


@router.post("/deploy", response_model=schemas.DeployResult, response_model_exclude_unset=True)
async def deploy(
    service: ServiceDep,
    spec: Annotated[str, Form(description="the API's entry of cortex.yaml, as JSON")],
    project: Annotated[UploadFile, File(description="the project folder as .tar.gz")],
) -> dict[str, Any]:
    """Store the API; answers at once, with its environment's state. A version whose
    environment must be built serves once the build succeeds (follow it with
    `GET /get/<api>/environment`); until then the version before it serves, and jobs
    submitted meanwhile run the new one once it is built."""
    try:
        spec_data = json.loads(spec)
    except json.JSONDecodeError as err:
        raise errors.InvalidRequest(f"spec: not valid JSON: {err}") from None
    except RecursionError:  # nesting deeper than the interpreter's stack allows
        raise errors.InvalidRequest("spec: nests too deeply") from None
    archive = await project.read(MAX_ARCHIVE_BYTES + 1)
    if len(archive) > MAX_ARCHIVE_BYTES:
        raise errors.BodyTooLarge(f"the project archive is over {MAX_ARCHIVE_BYTES} bytes")
    result, name, environment = await run_in_threadpool(service.deploys.deploy, spec_data, archive)
    message = {
        "created": f"created {name} (BatchAPI)",
        "updated": f"updated {name} (BatchAPI)",
        "up_to_date": f"{name} (BatchAPI) is up to date",
    }[result]
    return {"message": message, "result": result, "api_name": name, "environment": environment}


@router.get("/get", response_model=schemas.ApiList, response_model_exclude_unset=True)
def get_all(service: ServiceDep, base_url: BaseUrl) -> dict[str, Any]:
    return {
        "batch_apis": [
            _api_summary(service, api.name, base_url, 1) for api in service.deploys.list_apis()
        ]
    }


@router.get("/capacity", response_model=schemas.Capacity)
def get_capacity(service: ServiceDep) -> dict[str, Any]:
    """The worker pool's capacity, in use and free, and each job's reservations."""
    return service.pool.usage()


@router.get("/get/{api_name}", response_model=schemas.ApiDetails, response_model_exclude_unset=True)
def get_one(api_name: str, service: ServiceDep, base_url: BaseUrl) -> dict[str, Any]:
    return {"batch_api": _api_summary(service, api_name, base_url, _JOBS_PER_API)}


@router.get(
    "/get/{api_name}/environment",
    response_model=schemas.EnvironmentLog,
    response_model_exclude_unset=True,
)
def get_environment(
    api_name: str,
    service: ServiceDep,
    since: Annotated[
        int, Query(ge=0, le=2**53, description="where to read the build log from: `next`")
    ] = 0,
) -> dict[str, Any]:
    """The environment of the API's latest deploy, with its build log from `since` on (0: the
    start; then the `next` of the previous answer): `lines`, whole lines, and `next`."""
    environment = service.deploys.api_environment(service.lifecycle.get_api(api_name))
    lines: list[str] = []
    next_line = since
    if environment["key"] is not None:
        lines, next_line = service.deploys.build_log(environment["key"], since)
    return {**environment, "lines": lines, "next": next_line}


@router.delete("/delete/{api_name}", response_model=schemas.Message)
def delete_api(api_name: str, service: ServiceDep) -> dict[str, str]:
    service.deploys.delete_api(api_name)
    return {"message": f"deleting {api_name}"}


@router.post(
    "/{api_name}",
    response_model=schemas.JobSpec,
    response_model_exclude_unset=True,
    responses=submitdoc.SUBMIT_RESPONSES,
    openapi_extra={"requestBody": submitdoc.SUBMISSION_BODY},
)
async def submit(
    api_name: str,
    request: Request,
    service: ServiceDep,
    dry_run: Annotated[bool, Query(alias="dryRun")] = False,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description=(
                "1 to 255 printable ASCII characters. A submission that repeats a key used on "
                "this API in the last 24 hours creates nothing: with the same body it answers "
                "the job the key created (200, header `Idempotent-Replayed: true`), with "
                "another body 409 `batchapi.idempotency_conflict`. Ignored with dryRun."
            ),
        ),
    ] = None,
) -> dict[str, Any] | Response:
    """Create a job. Besides the spec's fields, a submission may carry `metadata` and a
    `webhook` (see the request body's schema)."""
    declared = request.headers.get("content-length", "")
    big = declared.isdigit() and int(declared) >= memory.TRIM_ABOVE_BYTES
    # A big item list's objects live only while this runs: no garbage collection over them.
    with memory.gc_paused() if big else contextlib.nullcontext():
        data = await read_json(request, service.settings.max_body_bytes)
        try:
            if idempotency_key is not None and not dry_run:
                job, replayed = await run_in_threadpool(
                    service.idempotent.submit, api_name, data, idempotency_key
                )
                body = views.job_spec_json(job, service.lifecycle.api_spec_for(job))
                if not replayed:
                    return body
                return Response(
                    exactjson.dumps(body),
                    media_type="application/json",
                    headers={"Idempotent-Replayed": "true"},
                )
            result = await run_in_threadpool(service.submissions.submit, api_name, data, dry_run)
        finally:
            del data  # a big item list: what it leaves in the heap goes back to the system after
            if request.state.body_bytes >= memory.TRIM_ABOVE_BYTES:
                memory.trim_soon()
    if isinstance(result, Job):
        return views.job_spec_json(result, service.lifecycle.api_spec_for(result))
    # Validation (and the first match) is done: stream the rest of the listing as it comes.
    return StreamingResponse(_dry_run_lines(result), media_type="text/plain; charset=utf-8")


def _dry_run_lines(files: Iterator[str], lines_per_write: int = 1000) -> Iterator[str]:
    """The matched files, a line each, then `validations passed`. An error after the answer
    has begun can only be told in the text: an `error:` line takes the place of the last."""
    page: list[str] = []
    try:
        for url in files:
            page.append(url + "\n")
            if len(page) >= lines_per_write:
                yield "".join(page)
                page = []
    except errors.CortexError as err:
        yield "".join(page) + f"error: {err.kind}: {err.message}\n"
        return
    yield "".join(page) + "validations passed\n"


# The status routes answer with JSON built by `_json`, not validated against the model (they
# are the hottest public path); the models are declared for the OpenAPI document, and a test
# checks that real answers carry only the fields they declare.
_LIST_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "model": schemas.JobDetails | schemas.JobList,
        "description": (
            "A job's status (with jobID), or the API's jobs. `job_status` holds, besides the "
            "spec's fields, `metadata` ({} if none), `webhook` ({url, events} or null) and "
            "`webhook_deliveries`: per delivery `delivery_id`, `event`, `state` (pending, "
            "delivered, failed), `attempts`, `last_status` (the receiver's HTTP status), "
            "`last_error`, `last_attempt_at`, `next_attempt_at`, `delivered_at`"
        ),
    }
}
_JOB_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "The job's status", "model": schemas.JobDetails}
}


def _json(data: Any) -> Response:
    """A JSON response written by orjson (json for integers past 64 bits in a config),
    skipping FastAPI's validation and encoding of the return value: status requests are the
    hottest public path."""
    return Response(exactjson.dumps(data), media_type="application/json")


@router.get("/{api_name}", response_model=None, responses=_LIST_DOC)
async def get_job_or_list(
    api_name: str,
    request: Request,
    service: ServiceDep,
    base_url: BaseUrl,
    job_id: Annotated[str | None, Query(alias="jobID")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """With `jobID`, a job's status; without, the API's jobs (in-progress first, then the
    newest), at most `limit`. `metadata.KEY=VALUE` query parameters (any number; all must
    match) list only the jobs whose metadata holds KEY with that VALUE."""
    if job_id is not None:
        return await _job_status(service, api_name, job_id, base_url)
    metadata = hookspec.metadata_filter(
        [(k, v) for k, v in request.query_params.multi_items() if k.startswith("metadata.")]
    )

    def listing() -> dict[str, Any]:
        jobs = service.lifecycle.list_jobs(api_name, limit, metadata)
        return {
            "api_name": api_name,
            "job_statuses": [status_json(service, job, base_url)["job_status"] for job in jobs],
        }

    return _json(await run_in_threadpool(listing))


@router.get("/{api_name}/{job_id}", response_model=None, responses=_JOB_DOC)
async def get_job(api_name: str, job_id: str, service: ServiceDep, base_url: BaseUrl) -> Response:
    return await _job_status(service, api_name, job_id, base_url)


@router.delete("/{api_name}", response_model=schemas.Message)
def stop_job_query(
    api_name: str,
    service: ServiceDep,
    job_id: Annotated[str | None, Query(alias="jobID")] = None,
) -> dict[str, str]:
    if job_id is None:
        raise errors.InvalidRequest("jobID: required (DELETE /<api>?jobID=<job id>)")
    service.lifecycle.stop_job(api_name, job_id)
    return {"message": f"stopped job {job_id}"}


@router.delete("/{api_name}/{job_id}", response_model=schemas.Message)
def stop_job(api_name: str, job_id: str, service: ServiceDep) -> dict[str, str]:
    service.lifecycle.stop_job(api_name, job_id)
    return {"message": f"stopped job {job_id}"}


@router.get(
    "/{api_name}/{job_id}/failed_batches",
    response_model=schemas.FailedBatches,
    response_model_exclude_unset=True,
)
def failed_batches(
    api_name: str,
    job_id: str,
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    """The batches that used all their attempts, with the last error and traceback."""
    job = service.lifecycle.get_job(api_name, job_id)
    return {"job_id": job.job_id, "failed_batches": service.lifecycle.failed_batches(job_id, limit)}


@router.get(
    "/{api_name}/{job_id}/workers",
    response_model=schemas.JobWorkers,
    response_model_exclude_unset=True,
)
def job_workers(api_name: str, job_id: str, service: ServiceDep) -> dict[str, Any]:
    """The job's workers, replacements included, oldest first: state, pid, exit code, the error
    that ended one, the replica that started it and when it was last heard from."""
    job = service.lifecycle.get_job(api_name, job_id)
    workers = service.lifecycle.workers(job.job_id)
    return {"job_id": job.job_id, "workers": [views.worker_json(w) for w in workers]}


class RetryBody(pydantic.BaseModel):
    workers: int | None = pydantic.Field(default=None, ge=1)


@router.post(
    "/{api_name}/{job_id}/retry_failed",
    response_model=schemas.JobSpec,
    response_model_exclude_unset=True,
)
def retry_failed(
    api_name: str, job_id: str, service: ServiceDep, body: RetryBody | None = None
) -> dict[str, Any]:
    """Re-run only the failed batches of a finished job, as a new job (`retry_of` links them)."""
    job = service.submissions.retry_failed(api_name, job_id, body.workers if body else None)
    return views.job_spec_json(job, service.lifecycle.api_spec_for(job))
