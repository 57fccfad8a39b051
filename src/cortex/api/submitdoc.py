"""The job submission as the OpenAPI document describes it.

The submit route reads its body itself (`read_json`): that keeps the spec's validation order
and error kinds, and enforces the size limit while streaming. FastAPI therefore cannot see the
body, so it is described here; validation stays in `cortex.jobspec`.
"""

from __future__ import annotations

from typing import Any

from cortex import globs, hookspec, schemas
from cortex.jobs import WEBHOOK_EVENTS
from cortex.spec import DEFAULT_MAX_ATTEMPTS, MAX_BATCH_SIZE, MAX_INT32

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
    "batch_timeout": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": MAX_INT32,
        "description": (
            "seconds one predict may run: past it, its worker is replaced and the batch's "
            "attempt fails with error kind batch_timeout (default: the API's batch_timeout in "
            "cortex.yaml, else no limit)"
        ),
    },
    "max_failed_batches": {
        "type": ["integer", "null"],
        "minimum": 0,
        "maximum": MAX_INT32,
        "description": (
            "the failure budget: once more batches than this have failed, the job leases no "
            "more, its workers are stopped, the batches left are listed as not_run, and it ends "
            "status_completed_with_failures (error kind batchapi.max_failed_batches_exceeded) "
            "without running on_job_complete"
        ),
    },
    "output": {
        "type": ["object", "null"],
        "required": ["path"],
        "properties": {
            "path": {
                "type": "string",
                "description": (
                    "a folder: s3://, gs://, or a local path under the server's data roots "
                    "(the rules of datasets; not http(s)://)"
                ),
            }
        },
        "description": (
            "where the job's results are written once its batches have ended, before its "
            "final status: <path>/<job_id>/results-NNNNN.jsonl (JSON lines, as GET "
            "/<api>/<job_id>/results streams them, a part file about every 64 MiB) and "
            "<path>/<job_id>/errors.jsonl (the failed and not-run batches, as failed_batches "
            "lists them); the job's status names them under output.files and output.errors"
        ),
    },
    "metadata": {
        "type": ["object", "null"],
        "maxProperties": hookspec.MAX_METADATA_KEYS,
        "propertyNames": {"minLength": 1, "maxLength": hookspec.MAX_METADATA_KEY_CHARS},
        "additionalProperties": {"type": "string", "maxLength": hookspec.MAX_METADATA_VALUE_CHARS},
        "description": (
            "labels of the job, returned in its status and the listing; "
            "`GET /<api>?metadata.KEY=VALUE` lists the jobs that have them"
        ),
    },
    "webhook": {
        "type": ["object", "null"],
        "required": ["url"],
        "additionalProperties": False,
        "properties": {
            "url": {
                "type": "string",
                "maxLength": hookspec.MAX_WEBHOOK_URL_CHARS,
                "description": "http(s) URL, under CORTEX_WEBHOOK_URLS when that is set",
            },
            "events": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                "default": ["job.ended"],
            },
        },
        "description": (
            "where the job's status JSON is POSTed (signed, retried) when it reaches the events "
            "named; overrides the API's `webhook` in cortex.yaml, which null turns off"
        ),
    },
}


def _submission_with(dataset: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "title": f"Submission with {dataset}",
        "required": ["workers", dataset],
        "properties": {**_SUBMISSION_FIELDS, dataset: schema},
    }


SUBMISSION_BODY: dict[str, Any] = {
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
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The job (with its `metadata`), or with `dryRun=true` the matched "
            "files, one per line, then the text `validations passed`"
        ),
        "model": schemas.JobSpec,
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "headers": {
            "Idempotent-Replayed": {
                "description": (
                    "`true` when an `Idempotency-Key` seen before answered the job it created "
                    "(nothing new was created)"
                ),
                "schema": {"type": "string", "enum": ["true"]},
            }
        },
    },
    409: {
        "description": (
            "`batchapi.idempotency_conflict`: the Idempotency-Key was used in the last 24 "
            "hours with another body"
        ),
    },
}
