"""Job, batch and worker states: the spec's status codes and the transitions between them."""

from __future__ import annotations

import enum
import os
import threading
import time


class JobStatus(enum.StrEnum):
    UNKNOWN = "status_unknown"
    ENQUEUING = "status_enqueuing"
    RUNNING = "status_running"
    ENQUEUE_FAILED = "status_enqueue_failed"
    COMPLETED_WITH_FAILURES = "status_completed_with_failures"
    SUCCEEDED = "status_succeeded"
    UNEXPECTED_ERROR = "status_unexpected_error"
    WORKER_ERROR = "status_worker_error"
    WORKER_OOM = "status_worker_oom"
    STOPPED = "status_stopped"
    TIMED_OUT = "status_timed_out"

    @property
    def in_progress(self) -> bool:
        return self in IN_PROGRESS

    @property
    def terminal(self) -> bool:
        return self not in IN_PROGRESS and self is not JobStatus.UNKNOWN

    @property
    def text(self) -> str:
        """The words the CLI prints for this status (spec §5.1)."""
        return _TEXT[self]

    @property
    def event(self) -> str:
        """The webhook event a move to this status is: `job.running`, `job.succeeded`, ..."""
        return "job." + self.value.removeprefix("status_")


IN_PROGRESS = frozenset({JobStatus.ENQUEUING, JobStatus.RUNNING})

_TEXT = {
    JobStatus.UNKNOWN: "unknown",
    JobStatus.ENQUEUING: "enqueuing",
    JobStatus.RUNNING: "running",
    JobStatus.ENQUEUE_FAILED: "failed while enqueuing",
    JobStatus.COMPLETED_WITH_FAILURES: "completed with failures",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.UNEXPECTED_ERROR: "unexpected error",
    JobStatus.WORKER_ERROR: "worker error",
    JobStatus.WORKER_OOM: "out of memory",
    JobStatus.STOPPED: "stopped",
    JobStatus.TIMED_OUT: "timed out",
}

# Enqueuing ends in running or a failure; running ends in any terminal status except an
# enqueue failure. A terminal status never changes: whoever writes first wins, and the loser's
# write is refused by the store (that is how a stop racing the last batch stays a stop).
_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.ENQUEUING: frozenset(
        {
            JobStatus.RUNNING,
            JobStatus.ENQUEUE_FAILED,
            JobStatus.UNEXPECTED_ERROR,
            JobStatus.STOPPED,
            JobStatus.TIMED_OUT,
        }
    ),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.COMPLETED_WITH_FAILURES,
            JobStatus.UNEXPECTED_ERROR,
            JobStatus.WORKER_ERROR,
            JobStatus.WORKER_OOM,
            JobStatus.STOPPED,
            JobStatus.TIMED_OUT,
        }
    ),
}


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return new in _ALLOWED.get(current, frozenset())


# A webhook subscribes to events by name: each status a job can move to (`JobStatus.event`),
# and `job.ended`, every final status at once (what a webhook gets when it names none).
ENDED_EVENT = "job.ended"
WEBHOOK_EVENTS = (
    ENDED_EVENT,
    *(s.event for s in JobStatus if s not in (JobStatus.UNKNOWN, JobStatus.ENQUEUING)),
)


def subscribed(events: list[str], status: JobStatus) -> bool:
    """Whether a webhook with these `events` is sent a job's move to `status`."""
    return status.event in events or (status.terminal and ENDED_EVENT in events)


class BatchState(enum.StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # Never run: the job's failure budget (`max_failed_batches`) was spent first.
    NOT_RUN = "not_run"


class WorkerState(enum.StrEnum):
    """A worker's life as `worker_counts` reports it (spec §5.3)."""

    PENDING = "pending"  # launched, its process has not said hello yet
    INITIALIZING = "initializing"  # process up, predictor __init__ running
    RUNNING = "running"  # predictor loaded, leasing batches
    SUCCEEDED = "succeeded"  # exited 0
    FAILED = "failed"  # exited non-zero, or was killed
    STALLED = "stalled"
    UNKNOWN = "unknown"

    @property
    def alive(self) -> bool:
        return self in (WorkerState.PENDING, WorkerState.INITIALIZING, WorkerState.RUNNING)

    @property
    def ended(self) -> bool:
        return self in _WORKER_ENDED


# A worker moves forward only. Reports arrive late and out of order (a worker's "running"
# retried after the server restarted, the launcher's exit after the leader marked the worker
# lost), so the store applies a report only if this table allows it: an ended worker stays
# ended, and the first end wins, which is also what makes each death handled once. A state
# may be reported again (a pid learnt later), except an ended one.
_WORKER_ENDED = frozenset({WorkerState.SUCCEEDED, WorkerState.FAILED, WorkerState.UNKNOWN})
_WORKER_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.PENDING: frozenset(WorkerState),
    WorkerState.STALLED: frozenset(WorkerState) - {WorkerState.PENDING},
    WorkerState.INITIALIZING: frozenset(WorkerState) - {WorkerState.PENDING},
    WorkerState.RUNNING: _WORKER_ENDED | {WorkerState.RUNNING, WorkerState.STALLED},
}


def can_move(current: WorkerState, new: WorkerState) -> bool:
    """Whether a worker in `current` may be recorded as `new`."""
    return new in _WORKER_ALLOWED.get(current, frozenset())


def moves_to(new: WorkerState) -> list[WorkerState]:
    """The states a worker may be in for a report of `new` to apply (for a WHERE clause)."""
    return [state for state, allowed in _WORKER_ALLOWED.items() if new in allowed]


_MAX_INT64 = (1 << 63) - 1
_id_lock = threading.Lock()
_last_id_ns = 0


def new_job_id() -> str:
    """The spec's job id: lowercase hex of MaxInt64 - now in ns, so newer ids sort first.

    Generation is serialised and strictly monotonic, so two submissions in the same nanosecond
    (or after a clock step back) still get distinct ids.
    """
    global _last_id_ns
    with _id_lock:
        now_ns = max(time.time_ns(), _last_id_ns + 1)
        _last_id_ns = now_ns
    return format(_MAX_INT64 - now_ns, "x")


def new_worker_id(job_id: str, index: int) -> str:
    """Workers are numbered within their job; the worker API checks the job prefix."""
    return f"{job_id}-{index}"


def new_batch_ids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs as text, from one read of the system's random source:
    as random as `uuid.uuid4()`, a quarter of its cost for the 10,000 batches of a big
    submission."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # the RFC 4122 variant
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-"
        f"{h[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]
