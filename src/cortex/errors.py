"""The error tree: every error the service reports has a `kind` and a readable message.

The HTTP layer turns a `CortexError` into `{"kind", "message"}` with the error's status code
(the spec answers every error with 400); the CLI prints the message on one line.

Every error belongs to one family a caller can catch: `InvalidRequest`, `NotFound`,
`Conflict`, `Unauthorized`, `Forbidden`, `ServerError`, `ConnectionFailed` and `WaitTimeout`.
The Python client raises, for an error answer, the family of the server's `kind` (by the
status code for a kind it does not know), carrying that kind, message and status code.
"""

from __future__ import annotations


class CortexError(Exception):
    """Root of every error that is reported to a user."""

    kind = "error"
    status_code = 400

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


class InvalidRequest(CortexError):
    """The request is malformed: bad JSON, a wrong type, a missing or unknown field."""

    kind = "request.invalid"


class BodyTooLarge(InvalidRequest):
    kind = "request.body_too_large"
    status_code = 413


class NotFound(CortexError):
    """What the request names does not exist: an API, a job, a route."""

    kind = "request.not_found"
    status_code = 404


class Conflict(CortexError):
    """The request does not fit the current state: stopping a job that has ended."""

    kind = "request.conflict"
    status_code = 409


class ServerError(CortexError):
    """The server failed to answer (a 5xx); the client reports it with the status code."""

    kind = "server.error"
    status_code = 500


class WaitTimeout(CortexError, TimeoutError):
    """`Client.wait` gave up waiting; the job goes on."""

    kind = "client.wait_timeout"


class JobMissing(NotFound):
    """A job that a request names inside the service does not exist (any more): deleted with
    its API. The worker API's answer that tells a worker its job is gone."""

    kind = "batchapi.job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} does not exist")


class StaleRequest(Conflict):
    """A worker request older than the last one the server acted on for that worker: a copy
    that arrived late. Nobody waits for its answer; it changes nothing."""

    kind = "worker.stale_request"
    status_code = 409


class Unauthorized(CortexError):
    kind = "auth.unauthorized"
    status_code = 401


class Forbidden(CortexError):
    kind = "auth.forbidden"
    status_code = 403


class InvalidSpec(InvalidRequest):
    """A cortex.yaml that does not validate; the message names the field."""

    kind = "spec.invalid"


class ApiNotDeployed(NotFound):
    kind = "resources.api_not_deployed"
    status_code = 400  # the spec's

    def __init__(self, api_name: str) -> None:
        super().__init__(f"{api_name} is not deployed")


class JobNotFound(NotFound):
    kind = "batchapi.job_not_found"
    status_code = 400  # the spec's

    def __init__(self, api_name: str, job_id: str) -> None:
        super().__init__(f"unable to find batch job {job_id} ({api_name} api)")


class JobNotInProgress(Conflict):
    kind = "batchapi.job_is_not_in_progress"
    status_code = 400  # the spec's

    def __init__(self) -> None:
        super().__init__("cannot stop batch job because it is not in progress")


class InvalidSubmission(InvalidRequest):
    """A job submission that fails the spec's validation; `kind` is the spec's kind."""

    kind = "batchapi.invalid_submission"


class InsufficientGpus(InvalidRequest):
    """A job asks for more GPUs than this server has free."""

    kind = "batchapi.insufficient_gpus"


class InsufficientCapacity(CortexError):
    """One worker of a job needs more CPU or memory than the server's whole capacity."""

    kind = "batchapi.insufficient_capacity"


class ConnectionFailed(CortexError):
    """The CLI or a worker could not reach the server."""

    kind = "client.connection_failed"


class IllegalTransition(Conflict):
    """A job status change the state machine does not allow (a bug or a lost race)."""

    kind = "batchapi.illegal_transition"
    status_code = 409


class SchemaNotCurrent(CortexError):
    """The store's schema is not the one this version needs: run `cortex migrate`."""

    kind = "store.schema_not_current"


class StoreUnavailable(CortexError):
    """The store's database cannot be reached."""

    kind = "store.unavailable"


class InUse(CortexError):
    """A data folder (or SQLite store) that another running server holds."""

    kind = "server.in_use"


class IdempotencyConflict(Conflict):
    """An `Idempotency-Key` used again (within its 24 hours) with a different body."""

    kind = "batchapi.idempotency_conflict"
    status_code = 409


class KeyTaken(Exception):
    """Internal: the `Idempotency-Key` of a submission was stored by a concurrent one first;
    the submission answers that one's job instead of creating its own."""


_FAMILIES: tuple[type[CortexError], ...] = (
    NotFound,
    Conflict,
    Unauthorized,
    Forbidden,
    InvalidRequest,
    ServerError,
)
_BY_STATUS: dict[int, type[CortexError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
}


def _kinds(cls: type[CortexError], table: dict[str, type[CortexError]]) -> None:
    for sub in cls.__subclasses__():
        family = next((f for f in sub.__mro__ if f in _FAMILIES), None)
        if family is not None and "kind" in vars(sub):
            table.setdefault(sub.kind, family)
        _kinds(sub, table)


def from_answer(status_code: int, kind: str, message: str) -> CortexError:
    """The error an error answer stands for: the family of its kind, else of its status."""
    table: dict[str, type[CortexError]] = {}
    _kinds(CortexError, table)
    family = table.get(kind) or _BY_STATUS.get(status_code)
    if family is None:
        family = ServerError if status_code >= 500 else InvalidRequest
    error = family(message, kind=kind)
    error.status_code = status_code
    return error
