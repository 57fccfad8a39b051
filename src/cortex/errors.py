"""The error tree: every error the service reports has a `kind` and a readable message.

The HTTP layer turns a `CortexError` into `{"kind", "message"}` with the error's status code
(the spec answers every error with 400); the CLI prints the message on one line.
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


class BodyTooLarge(CortexError):
    kind = "request.body_too_large"
    status_code = 413


class NotFound(CortexError):
    kind = "request.not_found"
    status_code = 404


class JobMissing(NotFound):
    """A job that a request names inside the service does not exist (any more): deleted with
    its API. The worker API's answer that tells a worker its job is gone."""

    kind = "batchapi.job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} does not exist")


class StaleRequest(CortexError):
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


class InvalidSpec(CortexError):
    """A cortex.yaml that does not validate; the message names the field."""

    kind = "spec.invalid"


class ApiNotDeployed(CortexError):
    kind = "resources.api_not_deployed"

    def __init__(self, api_name: str) -> None:
        super().__init__(f"{api_name} is not deployed")


class JobNotFound(CortexError):
    kind = "batchapi.job_not_found"

    def __init__(self, api_name: str, job_id: str) -> None:
        super().__init__(f"unable to find batch job {job_id} ({api_name} api)")


class JobNotInProgress(CortexError):
    kind = "batchapi.job_is_not_in_progress"

    def __init__(self) -> None:
        super().__init__("cannot stop batch job because it is not in progress")


class InvalidSubmission(CortexError):
    """A job submission that fails the spec's validation; `kind` is the spec's kind."""

    kind = "batchapi.invalid_submission"


class InsufficientGpus(CortexError):
    """A job asks for more GPUs than this server has free."""

    kind = "batchapi.insufficient_gpus"


class InsufficientCapacity(CortexError):
    """One worker of a job needs more CPU or memory than the server's whole capacity."""

    kind = "batchapi.insufficient_capacity"


class ConnectionFailed(CortexError):
    """The CLI or a worker could not reach the server."""

    kind = "client.connection_failed"


class IllegalTransition(CortexError):
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
