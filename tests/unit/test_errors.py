"""The error tree as the client rebuilds it from an answer: the family of the server's kind,
else of the status code, carrying kind, message and status."""

from __future__ import annotations

import pytest

from cortex import errors


@pytest.mark.parametrize(
    ("status", "kind", "family"),
    [
        (400, "batchapi.job_not_found", errors.NotFound),
        (400, "resources.api_not_deployed", errors.NotFound),
        (404, "request.not_found", errors.NotFound),
        (400, "batchapi.job_is_not_in_progress", errors.Conflict),
        (409, "worker.stale_request", errors.Conflict),
        (401, "auth.unauthorized", errors.Unauthorized),
        (403, "auth.forbidden", errors.Forbidden),
        (413, "request.body_too_large", errors.InvalidRequest),
        (400, "batchapi.specify_exactly_one_key", errors.InvalidRequest),  # a dynamic kind
        (400, "spec.invalid", errors.InvalidRequest),
        (404, "some.newer_kind", errors.NotFound),  # unknown kinds go by status
        (409, "some.newer_kind", errors.Conflict),
        (422, "some.newer_kind", errors.InvalidRequest),
        (503, "store.unavailable", errors.ServerError),
        (500, "request.failed", errors.ServerError),
    ],
)
def test_an_answer_raises_its_family(status: int, kind: str, family: type) -> None:
    error = errors.from_answer(status, kind, "what happened")
    assert type(error) is family
    assert isinstance(error, errors.CortexError)
    assert (error.kind, error.message, error.status_code) == (kind, "what happened", status)
    assert str(error) == "what happened"


def test_server_errors_keep_the_spec_status_in_their_family() -> None:
    assert isinstance(errors.JobNotFound("api", "j"), errors.NotFound)
    assert errors.JobNotFound("api", "j").status_code == 400  # the spec answers 400
    assert errors.ApiNotDeployed("api").status_code == 400
    assert isinstance(errors.JobNotInProgress(), errors.Conflict)
    assert errors.JobNotInProgress().status_code == 400
    assert isinstance(errors.InvalidSubmission("x"), errors.InvalidRequest)


def test_a_wait_timeout_is_a_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        raise errors.WaitTimeout("job j is still status_running after 1 s")
