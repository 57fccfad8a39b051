"""APIs and their deployed versions: deploys, their specs and code, and deleting an API with
its job history. An API's row orders the deploys, deletes and job submissions of that API."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex import errors
from cortex.jobs import JobStatus
from cortex.store import engine
from cortex.store import tables as t
from cortex.store.records import ApiRecord


class ApiStore(engine.BaseStore):
    """`Store`'s deploys, API reads and API deletes."""

    def put_api(
        self,
        name: str,
        spec_id: str,
        spec: dict[str, Any],
        archive: bytes,
        *,
        pending: bool = False,
    ) -> str:
        """Record a deploy; returns "created", "updated" or "up_to_date".

        With `pending`, the version's environment is not built yet: it becomes the API's
        pending version (new jobs run it and wait), and `finish_build` makes it the serving
        one. An API deployed for the first time serves its only version at once, built or not.
        """
        now = time.time()
        with self.write() as conn:
            # The API's row orders the deploys, deletes and job submissions of one API.
            row = lock(conn, name)
            if row is None:
                created = conn.execute(
                    engine.insert_ignore(conn, t.apis).values(
                        name=name,
                        spec_id=spec_id,
                        created_at=now,
                        updated_at=now,
                        pending_spec_id=spec_id if pending else None,
                    )
                )
                if created.rowcount == 1:
                    _insert_spec(conn, name, spec_id, spec, archive, now)
                    return "created"
                row = lock(conn, name)  # another deploy created it first
                assert row is not None
            latest = row.pending_spec_id or row.spec_id
            if latest == spec_id and row.pending_error is None:
                return "up_to_date"
            _insert_spec(conn, name, spec_id, spec, archive, now)
            if pending:
                # The serving version stays until this one is built.
                conn.execute(
                    t.apis.update()
                    .where(t.apis.c.name == name)
                    .values(pending_spec_id=spec_id, pending_error=None, updated_at=now)
                )
                return "updated"
            _serve(conn, name, spec_id, now)
            return "updated"

    def finish_build(self, name: str, spec_id: str, error: str | None) -> bool:
        """The environment of a pending version was built (it serves from now on) or failed
        (`error`; the version that served goes on serving). False if a later deploy or a
        delete replaced it meanwhile."""
        now = time.time()
        with self.write() as conn:
            row = lock(conn, name)
            if row is None or row.pending_spec_id != spec_id:
                return False
            if error is None:
                _serve(conn, name, spec_id, now)
            else:
                conn.execute(
                    t.apis.update()
                    .where(t.apis.c.name == name)
                    .values(pending_error=error, updated_at=now)
                )
            return True

    def spec_ids_in_use(self) -> set[str]:
        """The versions that serve, are being built, or run an in-progress job."""
        in_progress = [s.value for s in JobStatus if s.in_progress]
        with self.read() as conn:
            ids = set(conn.execute(sa.select(t.apis.c.spec_id)).scalars())
            ids |= set(
                conn.execute(
                    sa.select(t.apis.c.pending_spec_id).where(t.apis.c.pending_spec_id.is_not(None))
                ).scalars()
            )
            ids |= set(
                conn.execute(
                    sa.select(t.jobs.c.spec_id).where(t.jobs.c.status.in_(in_progress)).distinct()
                ).scalars()
            )
        return ids

    def get_api(self, name: str) -> ApiRecord | None:
        with self.read() as conn:
            row = conn.execute(
                sa.select(t.apis, t.api_specs.c.spec_json)
                .join(t.api_specs, t.api_specs.c.spec_id == t.apis.c.spec_id)
                .where(t.apis.c.name == name)
            ).first()
        return None if row is None else _api_record(row)

    def list_apis(self) -> list[ApiRecord]:
        with self.read() as conn:
            rows = conn.execute(
                sa.select(t.apis, t.api_specs.c.spec_json)
                .join(t.api_specs, t.api_specs.c.spec_id == t.apis.c.spec_id)
                .order_by(t.apis.c.name)
            ).all()
        return [_api_record(row) for row in rows]

    def get_spec_json(self, spec_id: str) -> dict[str, Any]:
        """An API version's spec, without its archive."""
        with self.read() as conn:
            row = conn.execute(
                sa.select(t.api_specs.c.spec_json).where(t.api_specs.c.spec_id == spec_id)
            ).one()
        result: dict[str, Any] = json.loads(row.spec_json)
        return result

    def get_spec(self, spec_id: str) -> tuple[dict[str, Any], bytes]:
        with self.read() as conn:
            row = conn.execute(
                sa.select(t.api_specs.c.spec_json, t.api_specs.c.archive).where(
                    t.api_specs.c.spec_id == spec_id
                )
            ).one()
        return json.loads(row.spec_json), bytes(row.archive)

    def delete_api(self, name: str) -> None:
        """Erase an API and its job history (its jobs must have been stopped)."""
        with self.write() as conn:
            if lock(conn, name) is None:
                return
            # Lock its jobs first (job rows before batch rows, as every writer does).
            deleted = (
                conn.execute(
                    sa.select(t.jobs.c.job_id)
                    .where(t.jobs.c.api_name == name)
                    .order_by(t.jobs.c.job_id)
                    .with_for_update()
                )
                .scalars()
                .all()
            )
            job_ids = sa.select(t.jobs.c.job_id).where(t.jobs.c.api_name == name)
            conn.execute(t.batches.delete().where(t.batches.c.job_id.in_(job_ids)))
            conn.execute(t.batch_payloads.delete().where(t.batch_payloads.c.job_id.in_(job_ids)))
            conn.execute(t.batch_results.delete().where(t.batch_results.c.job_id.in_(job_ids)))
            conn.execute(t.workers.delete().where(t.workers.c.job_id.in_(job_ids)))
            conn.execute(t.worker_replies.delete().where(t.worker_replies.c.job_id.in_(job_ids)))
            conn.execute(t.log_chunks.delete().where(t.log_chunks.c.job_id.in_(job_ids)))
            conn.execute(t.log_totals.delete().where(t.log_totals.c.job_id.in_(job_ids)))
            conn.execute(t.job_metadata.delete().where(t.job_metadata.c.job_id.in_(job_ids)))
            # (Not its jobs' webhook deliveries: the stops that deleting it made are events
            # too. They are sent, then pruned: `prune_orphan_deliveries`.)
            conn.execute(t.idempotency_keys.delete().where(t.idempotency_keys.c.api_name == name))
            conn.execute(t.jobs.delete().where(t.jobs.c.api_name == name))
            conn.execute(t.api_specs.delete().where(t.api_specs.c.api_name == name))
            conn.execute(t.apis.delete().where(t.apis.c.name == name))
        self.worker_jobs.forget(deleted)


# -- helpers that run inside a caller's transaction ---------------------------------------------


def _api_record(row: Any) -> ApiRecord:
    return ApiRecord(
        name=row.name,
        spec_id=row.spec_id,
        spec=json.loads(row.spec_json),
        created_at=row.created_at,
        updated_at=row.updated_at,
        pending_spec_id=row.pending_spec_id,
        pending_error=row.pending_error,
    )


def lock(conn: Connection, name: str, *, share: bool = False) -> Any:
    """The API's row (its versions) under FOR UPDATE, or FOR SHARE; None if not deployed."""
    query = sa.select(t.apis.c.spec_id, t.apis.c.pending_spec_id, t.apis.c.pending_error).where(
        t.apis.c.name == name
    )
    return conn.execute(query.with_for_update(read=share)).first()


def version_for_new_job(row: Any, name: str) -> str:
    """The version a job submitted now runs: the one being built, if a build is running (the
    job waits for it); else the serving one, unless that one never built."""
    if row.pending_spec_id is not None and row.pending_error is None:
        return str(row.pending_spec_id)
    if row.pending_spec_id == row.spec_id:
        raise errors.InvalidSubmission(
            f"api {name!r} has no version ready to run: the environment of its only version "
            f"failed to build ({row.pending_error}); fix it and deploy again",
            kind="batchapi.environment_failed",
        )
    return str(row.spec_id)


def _serve(conn: Connection, name: str, spec_id: str, now: float) -> None:
    """Make `spec_id` the serving version, and drop the versions that neither the API nor any
    job refers to any more. A job being created holds the API row (FOR SHARE), so none is
    half-written here."""
    conn.execute(
        t.apis.update()
        .where(t.apis.c.name == name)
        .values(spec_id=spec_id, pending_spec_id=None, pending_error=None, updated_at=now)
    )
    in_use = sa.select(t.jobs.c.spec_id).where(t.jobs.c.api_name == name)
    conn.execute(
        t.api_specs.delete().where(
            t.api_specs.c.api_name == name,
            t.api_specs.c.spec_id != spec_id,
            t.api_specs.c.spec_id.not_in(in_use),
        )
    )


def _insert_spec(
    conn: Connection, name: str, spec_id: str, spec: dict[str, Any], archive: bytes, now: float
) -> None:
    # A spec id is a digest of the spec and the code: if it is stored, it is this one.
    conn.execute(
        engine.insert_ignore(conn, t.api_specs).values(
            spec_id=spec_id,
            api_name=name,
            spec_json=json.dumps(spec),
            archive=archive,
            created_at=now,
        )
    )
