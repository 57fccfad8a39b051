"""The public API's JSON answers as typed records, one class per shape (spec §4 plus our
additive fields): the server declares them on its routes, so `/docs` shows them, and the Python
client parses every answer into them.

One place per record: a new field is one line in its class, and the route and the client both
see it. Records keep the fields a newer server adds that this version does not know yet
(`extra="allow"`), so an old client keeps working against a new server; `to_json()` gives back
exactly the JSON that was read: the keys the server sent, no others.

Times are the RFC 3339 strings the server sends, not parsed, so a record written back out is
the answer as it came; numbers and `config` pass through unchanged (integers of any size).
"""

from __future__ import annotations

from collections.abc import ItemsView, KeysView, ValuesView
from typing import Any

import pydantic

_IN_PROGRESS = frozenset({"status_enqueuing", "status_running"})


class Record(pydantic.BaseModel):
    """A JSON object of the public API. Fields read as attributes (`job.status`) and, like
    the JSON they come from, by key (`job["status"]`, `job.get("error")`); a record equals
    the dict of its JSON."""

    model_config = pydantic.ConfigDict(extra="allow")

    def to_json(self) -> dict[str, Any]:
        """The JSON object this record was read from: the keys that were set, as sent."""
        return self.model_dump(mode="json", exclude_unset=True)

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.model_fields_set or key in (self.model_extra or {})

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self else default

    # Read like the JSON object it stands for (code written against dict answers keeps working).
    def keys(self) -> KeysView[str]:
        return self.to_json().keys()

    def values(self) -> ValuesView[Any]:
        return self.to_json().values()

    def items(self) -> ItemsView[str, Any]:
        return self.to_json().items()

    def __eq__(self, other: object) -> bool:
        """Equal to a record of the same class and fields, and to the JSON it stands for."""
        if isinstance(other, dict):
            return self.to_json() == other
        return super().__eq__(other)


def _field(description: str, **kwargs: Any) -> Any:
    return pydantic.Field(description=description, **kwargs)


class Message(Record):
    """An answer that is one sentence: `stopped job <id>`, `deleting <api>`."""

    message: str = _field("what was done")


class JobOutput(Record):
    """Where a job's results go (`output` of a submission), and once written, the files."""

    path: str = _field("the folder as submitted: s3://, gs:// or a local path")
    files: list[str] | None = _field(
        "the results' JSON-lines part files, in order, once written", default=None
    )
    errors: str | None = _field(
        "the JSON-lines file of the failed and not-run batches, once written", default=None
    )


class JobSpec(Record):
    """The spec's Job object as submitted (spec §4.1), plus our additive fields."""

    job_id: str = _field("the job's id: 16 lowercase hex digits, smaller for newer jobs")
    api_name: str = _field("the Batch API the job runs on")
    workers: int = _field("worker processes requested")
    config: dict[str, Any] | None = _field("the submission's config, merged over predictor.config")
    api_id: str = _field("the API version the job runs (its spec id)")
    spec_id: str = _field("the API version the job runs")
    predictor_id: str = _field("a digest of the API version's predictor section")
    sqs_url: str | None = _field("always null: the queue is the store's batches table")
    total_batch_count: int = _field("batches enqueued so far; final once the job runs")
    start_time: str | None = _field("when the job was submitted, RFC 3339")
    timeout: int | None = _field("seconds from submission before the job is timed out")
    sqs_dead_letter_queue: dict[str, Any] | None = _field("always null: see max_attempts")
    max_attempts: int = _field("tries per batch before it counts as failed")
    retry_of: str | None = _field("the job whose failed batches this job re-runs")
    batch_timeout: int | None = _field(
        "seconds one predict may run before its worker is replaced; null: no limit"
    )
    max_failed_batches: int | None = _field(
        "the failure budget: more failed batches than this stop the job; null: none"
    )
    output: JobOutput | None = _field("where the job's results are written; null: nowhere")
    metadata: dict[str, str] = _field(
        "the submission's metadata: string keys and values; {} if none", default_factory=dict
    )
    priority: int = _field("higher first for free capacity (docs/design.md, Scheduling)", default=0)
    min_workers: int = _field("the fewest workers the job keeps while batches are left", default=0)


class Webhook(Record):
    """Where the service POSTs a job's status when it changes, and on which events."""

    url: str = _field("the receiver's http(s) URL")
    events: list[str] = _field("job.ended, job.running or a final status, e.g. job.succeeded")


class WebhookDelivery(Record):
    """One webhook delivery from the outbox."""

    delivery_id: str = _field("stable across retries: the `Cortex-Delivery` header")
    event: str = _field("the event delivered, e.g. job.succeeded")
    state: str = _field("pending (being retried), delivered (a 2xx answer) or failed (given up)")
    attempts: int = _field("requests sent so far")
    last_status: int | None = _field("the receiver's last HTTP status; null if unreachable")
    last_error: str | None = _field("why the last attempt failed")
    last_attempt_at: str | None = _field("when the last attempt was sent, RFC 3339")
    next_attempt_at: str | None = _field("when the next attempt is due, while pending")
    delivered_at: str | None = _field("when a 2xx answer came, RFC 3339")


class BatchCounts(Record):
    """A job's batches by state."""

    queued: int = _field("waiting for a worker", default=0)
    leased: int = _field("being run by a worker", default=0)
    succeeded: int = _field("done", default=0)
    failed: int = _field("failed on every attempt", default=0)
    not_run: int = _field(
        "never run: the failure budget was spent first (present only then)", default=0
    )


class BatchMetrics(Record):
    """The spec's batch counters (§5.2)."""

    succeeded: int = _field("batches that succeeded")
    failed: int = _field("batches that failed on every attempt")
    average_time_per_batch: float | None = _field(
        "mean seconds per succeeded batch; null before the first"
    )


class WorkerCounts(Record):
    """The job's workers by state (spec §5.3), while it is in progress."""

    pending: int = _field("launched, not started yet", default=0)
    initializing: int = _field("loading the predictor", default=0)
    running: int = _field("leasing batches", default=0)
    succeeded: int = _field("exited 0", default=0)
    failed: int = _field("exited non-zero or were killed", default=0)
    stalled: int = _field("pending for too long", default=0)
    unknown: int = _field("lost", default=0)


class JobError(Record):
    """Why a job failed, as data."""

    kind: str = _field("a machine-readable kind, e.g. worker.predictor_init_failed")
    message: str | None = _field("what happened, for people")
    traceback: str | None = _field("the predictor's traceback, when it raised")


class JobStatus(JobSpec):
    """A job's status (spec §4.1 `job_status`): the Job object and how far it is."""

    status: str = _field("the status code, e.g. status_running (spec §5.1)")
    end_time: str | None = _field("when the job ended, RFC 3339; null while in progress")
    batches_in_queue: int = _field("batches queued or leased; 0 once the job ended")
    batch_counts: BatchCounts = _field("every batch by state")
    batch_metrics: BatchMetrics | None = _field("the spec's batch counters")
    worker_counts: WorkerCounts | None = _field("workers by state; null unless in progress")
    pending_reason: str | None = _field("why workers of the job wait for capacity, if some do")
    dataset: dict[str, Any] | None = _field(
        "the dataset as submitted: its kind, and a file dataset's paths, globs and batch size "
        "(an item list's number of batches)"
    )
    error: JobError | None = _field("why the job failed; null if it did not")
    webhook: Webhook | None = _field("the job's webhook; null if none")
    webhook_deliveries: list[WebhookDelivery] = _field(
        "the webhook's deliveries, oldest first", default_factory=list
    )

    @property
    def in_progress(self) -> bool:
        """Enqueuing or running: the job has not ended."""
        return self.status in _IN_PROGRESS

    @property
    def succeeded(self) -> bool:
        return self.status == "status_succeeded"


class JobDetails(Record):
    """One job's status answer (`GET /<api>?jobID=`, `GET /<api>/<job_id>`)."""

    job_status: JobStatus = _field("the job and its progress")
    api_spec: dict[str, Any] = _field("the API version the job runs, as deployed")
    endpoint: str = _field("this job's URL")


class JobList(Record):
    """An API's jobs, newest first (`GET /<api>`)."""

    api_name: str = _field("the Batch API")
    job_statuses: list[JobStatus] = _field("the jobs, newest first")


class Environment(Record):
    """The environment of an API's latest deploy."""

    spec_id: str | None = _field("the API version it belongs to")
    key: str | None = _field("the environment's content key; null when none is needed")
    state: str = _field("building, ready, failed, missing or none (the server's interpreter)")
    message: str | None = _field("why the build failed", default=None)
    duration_s: float | None = _field("how long the build took", default=None)
    ended_at: float | None = _field("when the build ended, Unix seconds", default=None)


class EnvironmentLog(Environment):
    """An environment with its build log from a line on (`GET /get/<api>/environment`)."""

    lines: list[str] = _field("whole lines of the build log")
    next: int = _field("the `since` of the next read")


class DeployEnvironment(Environment):
    """The environment of a deploy's API version."""

    cached: bool = _field("whether it was built already: no build to wait for")


class DeployResult(Record):
    """One API of a deploy (`POST /deploy`)."""

    message: str = _field("created <api> (BatchAPI), updated ..., or ... is up to date")
    result: str = _field("created, updated or up_to_date")
    api_name: str = _field("the API deployed")
    environment: DeployEnvironment = _field("its environment: follow a build to its end")


class ApiSummary(Record):
    """A deployed Batch API with its jobs (spec §4.2)."""

    spec: dict[str, Any] = _field("the API's entry of cortex.yaml, with defaults")
    spec_id: str = _field("the API version serving new jobs")
    created_at: str | None = _field("when the API was first deployed, RFC 3339")
    updated_at: str | None = _field("when it was last deployed, RFC 3339")
    endpoint: str = _field("where jobs are submitted")
    environment: Environment = _field("the environment of the latest deploy")
    job_statuses: list[JobStatus] = _field("in-progress jobs, topped up with the newest")


class ApiList(Record):
    """Every deployed API (`GET /get`), each with its newest job."""

    batch_apis: list[ApiSummary] = _field("the deployed Batch APIs")


class ApiDetails(Record):
    """One API (`GET /get/<api>`)."""

    batch_api: ApiSummary = _field("the API and its jobs")


class FailedBatch(Record):
    """A batch that failed on every attempt."""

    batch_id: str = _field("the batch's id, as predict got it")
    index: int = _field("its place in the dataset, from 0")
    state: str | None = _field("failed, or not_run (the failure budget was spent)", default=None)
    attempts: int = _field("how often it was tried")
    error_kind: str | None = _field("the kind of the last error")
    error: str | None = _field("the last error's message")
    traceback: str | None = _field("the last error's traceback")
    payload: Any = _field(
        "the batch as predict got it; for a `delimited_files` batch, stored by reference, the "
        'reference: {"ref": [[url, version, start, end, first_line, items], ...]}'
    )


class FailedBatches(Record):
    """A job's failed batches (`GET /<api>/<job_id>/failed_batches`)."""

    job_id: str = _field("the job")
    failed_batches: list[FailedBatch] = _field("its failed batches, in dataset order")


class Worker(Record):
    """One worker process of a job."""

    worker_id: str = _field("the worker's id")
    name: str = _field("its name in the logs: worker-0, worker-1, ...")
    state: str = _field("pending, initializing, running, succeeded, failed, stalled, unknown")
    pid: int | None = _field("its process id, once known")
    exit_code: int | None = _field("how it exited")
    error: str | None = _field("what ended it, if it failed")
    replica_id: str | None = _field("the server replica that started it")
    draining: bool = _field("asked to finish its batch and exit (preempted, or not needed)")
    started_at: str | None = _field("RFC 3339")
    updated_at: str | None = _field("RFC 3339")
    last_seen: str | None = _field("when it was last heard from, RFC 3339")


class JobWorkers(Record):
    """A job's workers, replacements included (`GET /<api>/<job_id>/workers`)."""

    job_id: str = _field("the job")
    workers: list[Worker] = _field("oldest first")


class Amounts(Record):
    """Amounts of the pool's resources."""

    cpu: float = _field("CPU cores")
    mem: int = _field("memory, bytes")
    gpu: int = _field("GPUs")


class JobShare(Record):
    """One job's share of the worker pool."""

    job_id: str = _field("the job")
    api_name: str | None = _field("its API; null for an ended job", default=None)
    priority: int | None = _field("its priority", default=None)
    workers: int = _field("live workers holding capacity")
    draining: int = _field("of those, asked to finish a batch and exit")
    reserved: Amounts = _field("what its live workers hold")
    pending: int | None = _field("workers it wants that do not fit yet", default=None)
    pending_reason: str | None = _field("why they wait", default=None)


class Capacity(Record):
    """The worker pool: what it has, what live workers hold, and each job's share."""

    total: Amounts = _field("the launcher's capacity, or --capacity")
    used: Amounts = _field("held by live workers")
    free: Amounts = _field("total less used")
    jobs: list[JobShare] = _field("each job holding or wanting capacity")
