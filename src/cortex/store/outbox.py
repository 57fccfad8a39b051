"""The webhook outbox: a row per event a job's webhook asked for, written in the transaction
that changed the job's status (`record_event`), then claimed, sent and settled by the
deliverers of every replica (`cortex.webhooks`).

A claim moves a due row's `next_attempt_at` past a lease with a compare-and-set on the value
it read, so two replicas never send one delivery at once while both are alive; a replica that
dies mid-send leaves the row due again when the lease ends. Delivery is therefore at least
once: a receiver that answered 2xx to a send whose answer was lost gets it again, with the
same delivery id.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.jobs import JobStatus, subscribed
from cortex.store import engine
from cortex.store import tables as t
from cortex.store.records import Job

_D = t.webhook_deliveries


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A delivery claimed for one attempt."""

    delivery_id: str
    job_id: str
    api_name: str
    event: str
    url: str
    body: str | None  # null until the first attempt fixes it
    created_at: float
    attempts: int


class OutboxStore(engine.BaseStore):
    """`Store`'s webhook outbox."""

    def claim_deliveries(self, now: float, lease_s: float, limit: int = 16) -> list[Delivery]:
        """Due deliveries, each claimed for `lease_s` (it is due again then if not settled)."""
        with self.read() as conn:
            rows = conn.execute(
                sa.select(_D)
                .where(_D.c.next_attempt_at <= now)
                .order_by(_D.c.next_attempt_at)
                .limit(limit)
            ).all()
        claimed = []
        for row in rows:
            with self.write() as conn:
                # Compare-and-set on the due time read: another replica's claim (or a settled
                # attempt) changed it, and then this one is not ours.
                taken = conn.execute(
                    _D.update()
                    .where(
                        _D.c.delivery_id == row.delivery_id,
                        _D.c.next_attempt_at == row.next_attempt_at,
                    )
                    .values(next_attempt_at=now + lease_s)
                ).rowcount
            if taken == 1:
                claimed.append(
                    Delivery(
                        row.delivery_id,
                        row.job_id,
                        row.api_name,
                        row.event,
                        row.url,
                        row.body,
                        row.created_at,
                        row.attempts,
                    )
                )
        return claimed

    def fix_delivery_body(self, delivery_id: str, body: str) -> None:
        """The JSON every attempt of a delivery sends, fixed at its first attempt."""
        with self.write() as conn:
            conn.execute(
                _D.update()
                .where(_D.c.delivery_id == delivery_id, _D.c.body.is_(None))
                .values(body=body)
            )

    def settle_attempt(
        self,
        delivery_id: str,
        *,
        now: float,
        status: int | None,
        error: str | None,
        retry_at: float | None,
    ) -> None:
        """Record one attempt: delivered (a 2xx `status`), due again at `retry_at`, or, with
        neither, given up."""
        delivered = status is not None and 200 <= status < 300
        values: dict[str, Any] = {
            "attempts": _D.c.attempts + 1,
            "last_attempt_at": now,
            "last_status": status,
            "last_error": error,
            "next_attempt_at": None if delivered else retry_at,
        }
        if delivered:
            values["delivered_at"] = now
        elif retry_at is None:
            values["gave_up_at"] = now
        with self.write() as conn:
            conn.execute(
                _D.update()
                .where(_D.c.delivery_id == delivery_id, _D.c.delivered_at.is_(None))
                .values(**values)
            )

    def prune_orphan_deliveries(self) -> int:
        """Settled deliveries whose job is gone (deleted with its API; retention deletes a
        job's own with it)."""
        with self.write() as conn:
            return int(
                conn.execute(
                    _D.delete().where(
                        _D.c.next_attempt_at.is_(None),
                        _D.c.job_id.not_in(sa.select(t.jobs.c.job_id)),
                    )
                ).rowcount
            )

    def job_deliveries(self, job_id: str) -> list[dict[str, Any]]:
        with self.read() as conn:
            return deliveries(conn, job_id)


# -- helpers that run inside a caller's transaction ---------------------------------------------


def record_event(conn: Connection, job: Job, status: JobStatus) -> None:
    """A delivery of the job's move to `status`, if its webhook asked for that event. Called
    in the transaction that writes the status, so that the two commit together."""
    if job.webhook is None or not subscribed(job.webhook["events"], status):
        return
    now = time.time()
    conn.execute(
        _D.insert().values(
            delivery_id=str(uuid.uuid4()),
            job_id=job.job_id,
            api_name=job.api_name,
            event=status.event,
            url=job.webhook["url"],
            created_at=now,
            next_attempt_at=now,
        )
    )


def deliveries(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    """A job's deliveries as its status shows them, oldest first."""
    rows = conn.execute(
        sa.select(
            _D.c.delivery_id,
            _D.c.event,
            _D.c.attempts,
            _D.c.last_status,
            _D.c.last_error,
            _D.c.last_attempt_at,
            _D.c.next_attempt_at,
            _D.c.delivered_at,
            _D.c.gave_up_at,
        )
        .where(_D.c.job_id == job_id)
        .order_by(_D.c.created_at)
    ).all()
    return [dict(row._mapping) for row in rows]
