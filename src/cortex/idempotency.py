"""Idempotent submissions: a POST with an `Idempotency-Key` creates its job at most once per
API and key in 24 hours, however often it is sent (a client retrying after a timeout) and
however many copies arrive at once (on any replica)."""

from __future__ import annotations

import time
from typing import Any

from cortex import errors, hookspec, spec
from cortex.lifecycle import Lifecycle
from cortex.store import Job, Store
from cortex.store.submissions import Extras
from cortex.submissions import ENQUEUE_INTERRUPTED, Submissions


class IdempotentSubmits:
    def __init__(self, store: Store, submissions: Submissions, lifecycle: Lifecycle) -> None:
        self.store = store
        self.submissions = submissions
        self.lifecycle = lifecycle

    def submit(self, api_name: str, data: Any, key: str) -> tuple[Job, bool]:
        """The job the key created on this API in the last 24 hours if there is one (and
        True), else a new job (and False). The key with another body is refused (409): the
        bodies are compared by the digest of their canonical JSON (key order aside)."""
        hookspec.check_idempotency_key(key)
        digest = spec.digest(spec.canonical_json(data))
        found = self._usable(api_name, key)
        if found is None:
            try:
                extras = Extras(idempotency_key=key, body_digest=digest)
                job = self.submissions.submit(api_name, data, extras=extras)
            except errors.KeyTaken:
                # A concurrent submission with this key stored it first (the key is written
                # in the transaction that creates the job): answer that one's job.
                found = self.store.idempotent_job(api_name, key, time.time())
                if found is None:  # and it was deleted since, with its API
                    raise errors.ApiNotDeployed(api_name) from None
            else:
                assert isinstance(job, Job)  # not a dry run
                return job, False
        body_digest, job_id = found
        if body_digest != digest:
            raise errors.IdempotencyConflict(
                f"Idempotency-Key {key!r} was used on {api_name} for job {job_id} with another "
                "request body; use a new key for a new job"
            )
        return self.lifecycle.get_job(api_name, job_id), True

    def _usable(self, api_name: str, key: str) -> tuple[str, str] | None:
        """What the key names, unless that is a job whose items were lost (its server died
        while writing them, before it answered): the client never got a job id for it, and
        sending the request again is what that job's error asks for, so the key is free."""
        found = self.store.idempotent_job(api_name, key, time.time())
        if found is not None:
            job = self.store.get_job(found[1])
            if job is None or job.error_kind == ENQUEUE_INTERRUPTED:
                self.store.release_idempotency_key(api_name, key, found[1])
                return None
        return found
