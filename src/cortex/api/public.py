"""The public API: deploy, submit, status, stop, list (spec §4)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse

from cortex import errors, exactjson, globs, views
from cortex.api import deps
from cortex.api.body import read_json
from cortex.project import MAX_ARCHIVE_BYTES
from cortex.service import Service
from cortex.spec import DEFAULT_MAX_ATTEMPTS, MAX_BATCH_SIZE, MAX_INT32
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
    job, batch_counts, worker_counts = progress
    api_spec = service.lifecycle.api_spec_for(job)
    return {
        "job_status": views.job_status_json(
            job, api_spec, batch_counts=batch_counts, worker_counts=worker_counts
        ),
        "api_spec": api_spec,
        "endpoint": f"{base_url}/{job.api_name}/{job.job_id}",
    }


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


@router.post("/deploy")
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


@router.get("/get")
def get_all(service: ServiceDep, base_url: BaseUrl) -> dict[str, Any]:
    return {
        "batch_apis": [
            _api_summary(service, api.name, base_url, 1) for api in service.deploys.list_apis()
        ]
    }


class Amounts(pydantic.BaseModel):
    cpu: float = pydantic.Field(description="CPU cores")
    mem: int = pydantic.Field(description="memory, bytes")
    gpu: int = pydantic.Field(description="GPUs")


class JobShare(pydantic.BaseModel):
    job_id: str
    api_name: str | None = pydantic.Field(None, description="None for an ended job")
    priority: int | None = None
    workers: int = pydantic.Field(description="live workers holding capacity")
    draining: int = pydantic.Field(description="of those, asked to finish a batch and exit")
    reserved: Amounts = pydantic.Field(description="what its live workers hold")
    pending: int | None = pydantic.Field(None, description="workers it wants that do not fit yet")
    pending_reason: str | None = None


class Capacity(pydantic.BaseModel):
    """The worker pool: what it has, what live workers hold, and each job's share."""

    total: Amounts = pydantic.Field(description="the launcher's capacity, or --capacity")
    used: Amounts = pydantic.Field(description="held by live workers")
    free: Amounts
    jobs: list[JobShare]


@router.get("/capacity", response_model=Capacity)
def get_capacity(service: ServiceDep) -> dict[str, Any]:
    """The worker pool's capacity, in use and free, and each job's reservations."""
    return service.pool.usage()


@router.get("/get/{api_name}")
def get_one(api_name: str, service: ServiceDep, base_url: BaseUrl) -> dict[str, Any]:
    return {"batch_api": _api_summary(service, api_name, base_url, _JOBS_PER_API)}


@router.get("/get/{api_name}/environment")
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


@router.delete("/delete/{api_name}")
def delete_api(api_name: str, service: ServiceDep) -> dict[str, str]:
    service.deploys.delete_api(api_name)
    return {"message": f"deleting {api_name}"}


_POSITIVE_INT = {"type": "integer", "minimum": 1}
_BATCH_SIZE = {**_POSITIVE_INT, "maximum": MAX_BATCH_SIZE}
_ITEM_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["items", "batch_size"],
    "properties": {
        "items": {"type": "array", "minItems": 1, "items": {}},
        "batch_size": _BATCH_SIZE,
    },
}
_GLOBS: dict[str, Any] = {
    "type": "array",
    "maxItems": globs.MAX_GLOBS,
    "items": {"type": "string", "maxLength": globs.MAX_GLOB_CHARS},
    "description": "globs matched against each file's full URL: * stops at /, ** crosses it",
}
_S3_DATASET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "Files under the prefixes in `s3_paths` (or `paths`): s3://, gs://, http(s):// or local "
        "paths under the server's data roots. file_path_lister: each file's URL is an item; "
        "delimited_files: each JSON value of the JSON-lines files is."
    ),
    "required": ["s3_paths", "batch_size"],
    "properties": {
        "s3_paths": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "includes": _GLOBS,
        "excludes": _GLOBS,
        "batch_size": _BATCH_SIZE,
    },
}
_SUBMISSION_FIELDS: dict[str, Any] = {
    "workers": {
        **_POSITIVE_INT,
        "description": "the most workers the job runs at once (never more than it has "
        "batches left; fewer while the pool is busy: the others wait as pending)",
    },
    "priority": {
        "type": "integer",
        "minimum": -MAX_INT32,
        "maximum": MAX_INT32,
        "default": 0,
        "description": "higher first for free capacity; a waiting job may make workers of "
        "lower-priority jobs drain at their next batch boundary",
    },
    "min_workers": {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_INT32,
        "default": 0,
        "description": "the fewest workers the job keeps while it has batches left (at most "
        "`workers`)",
    },
    "config": {
        "type": ["object", "null"],
        "description": "merged over the API's predictor.config for this job",
    },
    "timeout": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": MAX_INT32,
        "description": "seconds from submission before the job is timed out",
    },
    "max_attempts": {
        **_POSITIVE_INT,
        "maximum": MAX_INT32,
        "default": DEFAULT_MAX_ATTEMPTS,
        "description": "tries per batch before it counts as failed",
    },
}


def _submission_with(dataset: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "title": f"Submission with {dataset}",
        "required": ["workers", dataset],
        "properties": {**_SUBMISSION_FIELDS, dataset: schema},
    }


# The submit route reads its body itself (`read_json`): that keeps the spec's validation order
# and error kinds, and enforces the size limit while streaming. FastAPI therefore cannot see the
# body, so it is described here for the OpenAPI document; validation stays in `spec`.
_SUBMISSION_BODY: dict[str, Any] = {
    "required": True,
    "description": (
        "A job submission (spec §4.1) with exactly one dataset: `item_list`, `file_path_lister` "
        "or `delimited_files`. Unknown keys are ignored."
    ),
    "content": {
        "application/json": {
            "schema": {
                "title": "Submission",
                "oneOf": [
                    _submission_with("item_list", _ITEM_LIST_SCHEMA),
                    _submission_with("file_path_lister", _S3_DATASET_SCHEMA),
                    _submission_with("delimited_files", _S3_DATASET_SCHEMA),
                ],
            },
            "example": {
                "workers": 1,
                "item_list": {"items": ["a", "b", "c"], "batch_size": 2},
                "config": {"threshold": 0.5},
                "timeout": 600,
                "max_attempts": DEFAULT_MAX_ATTEMPTS,
            },
        }
    },
}
_SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The job, or with `dryRun=true` the matched files, one per line, then the text "
            "`validations passed`"
        ),
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}


@router.post(
    "/{api_name}",
    response_model=None,
    responses=_SUBMIT_RESPONSES,
    openapi_extra={"requestBody": _SUBMISSION_BODY},
)
async def submit(
    api_name: str,
    request: Request,
    service: ServiceDep,
    dry_run: Annotated[bool, Query(alias="dryRun")] = False,
) -> dict[str, Any] | PlainTextResponse | StreamingResponse:
    data = await read_json(request, service.settings.max_body_bytes)
    result = await run_in_threadpool(service.submissions.submit, api_name, data, dry_run)
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


_STATUS_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A job's status (with jobID), or the API's jobs",
        "content": {"application/json": {}},
    }
}


def _json(data: Any) -> Response:
    """A JSON response written by orjson (json for integers past 64 bits in a config),
    skipping FastAPI's validation and encoding of the return value: status requests are the
    hottest public path."""
    return Response(exactjson.dumps(data), media_type="application/json")


@router.get("/{api_name}", response_model=None, responses=_STATUS_DOC)
async def get_job_or_list(
    api_name: str,
    service: ServiceDep,
    base_url: BaseUrl,
    job_id: Annotated[str | None, Query(alias="jobID")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    if job_id is not None:
        return await _job_status(service, api_name, job_id, base_url)

    def listing() -> dict[str, Any]:
        jobs = service.lifecycle.list_jobs(api_name, limit)
        return {
            "api_name": api_name,
            "job_statuses": [status_json(service, job, base_url)["job_status"] for job in jobs],
        }

    return _json(await run_in_threadpool(listing))


@router.get("/{api_name}/{job_id}", response_model=None, responses=_STATUS_DOC)
async def get_job(api_name: str, job_id: str, service: ServiceDep, base_url: BaseUrl) -> Response:
    return await _job_status(service, api_name, job_id, base_url)


@router.delete("/{api_name}")
def stop_job_query(
    api_name: str,
    service: ServiceDep,
    job_id: Annotated[str | None, Query(alias="jobID")] = None,
) -> dict[str, str]:
    if job_id is None:
        raise errors.InvalidRequest("jobID: required (DELETE /<api>?jobID=<job id>)")
    service.lifecycle.stop_job(api_name, job_id)
    return {"message": f"stopped job {job_id}"}


@router.delete("/{api_name}/{job_id}")
def stop_job(api_name: str, job_id: str, service: ServiceDep) -> dict[str, str]:
    service.lifecycle.stop_job(api_name, job_id)
    return {"message": f"stopped job {job_id}"}


@router.get("/{api_name}/{job_id}/failed_batches")
def failed_batches(
    api_name: str,
    job_id: str,
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    """The batches that used all their attempts, with the last error and traceback."""
    job = service.lifecycle.get_job(api_name, job_id)
    return {"job_id": job.job_id, "failed_batches": service.lifecycle.failed_batches(job_id, limit)}


@router.get("/{api_name}/{job_id}/workers")
def job_workers(api_name: str, job_id: str, service: ServiceDep) -> dict[str, Any]:
    """The job's workers, replacements included, oldest first: state, pid, exit code, the error
    that ended one, the replica that started it and when it was last heard from."""
    job = service.lifecycle.get_job(api_name, job_id)
    workers = service.lifecycle.workers(job.job_id)
    return {"job_id": job.job_id, "workers": [views.worker_json(w) for w in workers]}


class RetryBody(pydantic.BaseModel):
    workers: int | None = pydantic.Field(default=None, ge=1)


@router.post("/{api_name}/{job_id}/retry_failed")
def retry_failed(
    api_name: str, job_id: str, service: ServiceDep, body: RetryBody | None = None
) -> dict[str, Any]:
    """Re-run only the failed batches of a finished job, as a new job (`retry_of` links them)."""
    job = service.submissions.retry_failed(api_name, job_id, body.workers if body else None)
    return views.job_spec_json(job, service.lifecycle.api_spec_for(job))
